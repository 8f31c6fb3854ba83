# hutch: `make run` and `make test` do all the set-up on a fresh Debian/Ubuntu machine.

AGENT_TARGET := x86_64-unknown-linux-gnu
AGENT := target/agent/$(AGENT_TARGET)/release/hutch-agent
HUTCH_DATA_DIR ?= /var/lib/hutch
export HUTCH_DATA_DIR

.PHONY: all deps test-deps build agent run test lint fmt bench clean-test

all: build

deps:
	@scripts/install-deps.sh

test-deps:
	@scripts/install-deps.sh --test

# The guest agent runs as PID 1 in an initramfs, so it is linked statically. A separate target dir
# keeps its RUSTFLAGS from invalidating the host build.
agent:
	RUSTFLAGS="-C target-feature=+crt-static" cargo build --release -p hutch-agent \
		--target $(AGENT_TARGET) --target-dir target/agent

build: agent
	cargo build --release -p hutch

run: deps build
	@echo
	@echo "Starting hutchd (data dir $(HUTCH_DATA_DIR)). In another terminal:"
	@echo "  export PATH=$(CURDIR)/target/release:\$$PATH HUTCH_DATA_DIR=$(HUTCH_DATA_DIR)"
	@echo "  hutch image import ./image-oci-dir --name busybox"
	@echo "  hutch new --image busybox --name demo && hutch exec demo -- uname -a"
	@echo "  SSH: restart with HUTCH_ADMIN_KEYS=~/.ssh/id_ed25519.pub, then: ssh -p 2222 localhost help"
	@echo
	target/release/hutchd --data-dir $(HUTCH_DATA_DIR)

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

# The tests' hutchds remove their own cgroups; the shared parent they were made under goes last.
test: test-deps agent lint
	cargo test --workspace -- --test-threads=4
	@rmdir /sys/fs/cgroup/hutch /sys/fs/cgroup/*/hutch 2>/dev/null || true

bench: build
	@scripts/install-deps.sh --bench
	cargo build --release -p hutch --examples
	target/release/examples/bench
	target/release/examples/bench_pull
	target/release/examples/bench_ssh
