#!/usr/bin/env bash
# The agent's main job in a sandbox: a fresh network namespace with a listener on monit's
# port 127.0.0.1:2822, the agent started in its own cgroup with its firewall installed, and
# proof at the packet level that the agent's cgroup (and an allowed job) get through while
# another process is refused. Touches only the namespace, cgroups and files it creates.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release}
AGENT=$PWD/$BIN/bosh-agent
PROBE=$PWD/$BIN/netprobe
[ "$(id -u)" = 0 ] || { echo "demo: run as root" >&2; exit 1; }

if [ -f /sys/fs/cgroup/cgroup.controllers ]; then V2=/sys/fs/cgroup; else V2=/sys/fs/cgroup/unified; fi
[ -f "$V2/cgroup.procs" ] || { echo "demo: no cgroup2 hierarchy at /sys/fs/cgroup or /sys/fs/cgroup/unified" >&2; exit 1; }

WORK=$(mktemp -d /tmp/bosh-agent-demo.XXXXXX)
CG=$V2/bosh-agent-demo-$$
NS=$WORK/netns
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for d in agent/bosh-agent agent job other; do rmdir "$CG/$d" 2>/dev/null || true; done
  rmdir "$CG" 2>/dev/null || true
  umount "$NS" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
# in_cg <cgroup> <uid> <cmd...>: run a command inside the sandbox namespace, in a cgroup, as a uid.
in_cg() {
  local cg=$1 uid=$2; shift 2
  nsenter --net="$NS" -- sh -c 'cg=$0 uid=$1; shift; echo $$ > "$cg/cgroup.procs" && exec setpriv --reuid="$uid" --regid="$uid" --clear-groups -- "$@"' "$cg" "$uid" "$@"
}
try() { # try <label> <cgroup> <uid>
  if in_cg "$2" "$3" "$PROBE" connect 127.0.0.1:2822 --timeout-ms 1000 >/dev/null 2>&1; then
    printf '  %-52s -> CONNECTED\n' "$1"
  else
    printf '  %-52s -> REFUSED (SYN dropped)\n' "$1"
  fi
}

step "sandbox: network namespace $NS, cgroups under $CG"
touch "$NS"; unshare --net="$NS" true
nsenter --net="$NS" ip link set lo up
mkdir -p "$CG/agent" "$CG/job" "$CG/other"
export BOSH_AGENT_RUN_DIR=$WORK/run
cat > "$WORK/agent.json" <<JSON
{"Platform":{"Linux":{"UseMonitIptablesFirewall":false,"EnableNATSFirewall":false,
  "Firewall":{"MonitAllowRoot":true,"ReconcileIntervalSeconds":2}}}}
JSON

step "a listener standing in for monit on 127.0.0.1:2822"
nsenter --net="$NS" "$PROBE" listen 127.0.0.1:2822 >/dev/null 2>&1 & pids+=($!)

step "the agent: bosh-agent -P ubuntu -C agent.json -b $WORK (in cgroup agent)"
nsenter --net="$NS" -- sh -c 'echo $$ > "$0/cgroup.procs" && exec "$@"' "$CG/agent" \
  "$AGENT" -P ubuntu -C "$WORK/agent.json" -b "$WORK" 2> "$WORK/agent.log" & pids+=($!)
for _ in $(seq 100); do [ -f "$BOSH_AGENT_RUN_DIR/firewall.json" ] && break; sleep 0.05; done
sed 's/^/  /' "$WORK/agent.log"

step "the table the agent installed"
nsenter --net="$NS" nft list table inet bosh_agent | sed 's/^/  /'

step "who reaches monit's port (non-root processes, uid 65534)"
try "a process in the agent's cgroup" "$CG/agent" 65534
try "a process in another cgroup" "$CG/other" 65534
try "a job before 'bosh-agent firewall-allow monit'" "$CG/job" 65534

step "the job's pre-start runs: bosh-agent firewall-allow monit (as root, from the job's cgroup)"
in_cg "$CG/job" 0 "$AGENT" firewall-allow monit | sed 's/^/  /'
try "the job after firewall-allow" "$CG/job" 65534
try "root in another cgroup (MonitAllowRoot: true)" "$CG/other" 0
try "still: a process in another cgroup" "$CG/other" 65534

step "bosh-agent firewall status"
nsenter --net="$NS" "$AGENT" firewall status | sed 's/^/  /'

step "drift: someone deletes chain monit_access; the agent repairs it"
nsenter --net="$NS" nft delete chain inet bosh_agent monit_access
try "a process in another cgroup, right after the deletion" "$CG/other" 65534
sleep 2.5
try "a process in another cgroup, after the agent's repair" "$CG/other" 65534
nsenter --net="$NS" "$AGENT" firewall status | grep -E 'repairs|live table' | sed 's/^/  /'

step "SIGTERM: the agent stops, the firewall stays"
kill "${pids[1]}"; wait "${pids[1]}" 2>/dev/null || true
try "a process in another cgroup, agent stopped" "$CG/other" 65534
echo
echo "demo finished; the sandbox is removed."
