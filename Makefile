# The verbs people type. All of them run as root on Debian 12 and install what they need.
CARGO ?= cargo

.PHONY: deps build test demo bench lint install clean

deps:
	@bash scripts/deps.sh

build: deps
	$(CARGO) build --workspace

# Every test: unit tests of pure code and the real-part tests (nft in fresh network
# namespaces, real cgroups, real sockets). Needs root.
test: deps
	$(CARGO) test --workspace

# The agent's main job in a sandbox: a network namespace with a listener on monit's port,
# the agent's firewall installed, the agent's cgroup getting through and another refused.
demo: deps
	$(CARGO) build -p cli -p integration --release
	bash scripts/demo.sh

# Packet-path cost and firewall-allow latency/RSS, side by side in one run (see BENCHMARKS.md).
bench: deps
	$(CARGO) build -p cli -p integration --release
	./target/release/bench

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
