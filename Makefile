# The verbs people type. All of them run as root on Debian 12 and install what they need.
CARGO ?= cargo

.PHONY: deps build test demo demo-firewall bench fuzz lint install clean

deps:
	@bash scripts/deps.sh

build: deps
	$(CARGO) build --workspace

# Every test: unit tests of pure code and the real-part tests (nft in fresh network
# namespaces, real cgroups, real sockets). Needs root.
test: deps
	$(CARGO) test --workspace

# The whole agent in a sandbox: network namespace, cgroups, nats-server with mutual TLS, a DNS
# server, monit with a sample job; this acts as the director (ping, get_state, stop, start),
# prints `firewall status`, and shows a process outside the agent's cgroup refused by the monit
# and NATS rules.
demo: deps
	$(CARGO) build -p cli -p integration --release
	./target/release/demo

# The monit firewall alone: firewall-allow for a job, drift repair, rules kept after SIGTERM.
demo-firewall: deps
	$(CARGO) build -p cli -p integration --release
	bash scripts/demo.sh

# Packet-path cost, firewall-allow latency/RSS, the agent against nats-server, and deploys
# (prepare/apply from a DAV blobstore, compile_package), and a fleet of FLEET_AGENTS agents (200, all
# started together; FLEET_WAVE, FLEET_ROUNDS, FLEET_TLS_TIMEOUT_MS=10000 for the nodes) on a
# 3-node NATS cluster, side by side in one run (see BENCHMARKS.md, RELIABILITY.md).
bench: deps
	$(CARGO) build -p cli -p integration --release
	./target/release/bench
	./target/release/bench-runtime
	./target/release/bench-deploy
	./target/release/bench-egress
	./target/release/bench-dns
	./target/release/bench-fleet

# Coverage-guided fuzzing of the parsers, the renderer and the archive reader, FUZZ_SECONDS
# each (default 60); installs cargo-fuzz on first use (see scripts/fuzz.sh).
fuzz: deps
	bash scripts/fuzz.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Installs the binary as stemcells lay it out, plus the alias job releases call.
install:
	$(CARGO) build -p cli --release
	install -D -m 0755 target/release/bosh-agent /var/vcap/bosh/bin/bosh-agent
	ln -sf bosh-agent /var/vcap/bosh/bin/bosh-enable-monit-access

clean:
	$(CARGO) clean
