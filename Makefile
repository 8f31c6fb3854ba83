# hutch: `make run` and `make test` do all the set-up on a fresh Debian/Ubuntu machine.

AGENT_TARGET := x86_64-unknown-linux-gnu
AGENT := target/agent/$(AGENT_TARGET)/release/hutch-agent
HUTCH_DATA_DIR ?= /var/lib/hutch
export HUTCH_DATA_DIR

# `make install`: where things go (GNU conventions; DESTDIR for staging and packaging).
PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
DATADIR ?= $(PREFIX)/share
SYSTEMDUNITDIR ?= $(PREFIX)/lib/systemd/system
BASHCOMPDIR ?= $(DATADIR)/bash-completion/completions
FISHCOMPDIR ?= $(DATADIR)/fish/vendor_completions.d
# zsh's own site directory for /usr/local; Debian's zsh reads packages' from vendor-completions.
ifeq ($(PREFIX),/usr)
ZSHCOMPDIR ?= $(DATADIR)/zsh/vendor-completions
else
ZSHCOMPDIR ?= $(DATADIR)/zsh/site-functions
endif
# Where install-files takes hutch and hutchd from (the install test points it at a debug build).
BIN_DIR ?= target/release
INSTALLED := $(BINDIR)/hutchd $(BINDIR)/hutch $(BINDIR)/hutch-agent \
	$(SYSTEMDUNITDIR)/hutchd.service $(BASHCOMPDIR)/hutch $(ZSHCOMPDIR)/_hutch \
	$(FISHCOMPDIR)/hutch.fish

.PHONY: all deps test-deps build agent run test lint fmt bench bench-control bench-cluster clean-test install install-files uninstall

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
# --no-fail-fast: one failing test binary does not hide the results of the others.
test: test-deps agent lint
	cargo test --workspace --no-fail-fast -- --test-threads=4
	@rmdir /sys/fs/cgroup/hutch /sys/fs/cgroup/*/hutch 2>/dev/null || true

bench: build
	@scripts/install-deps.sh --bench
	cargo build --release -p hutch --examples
	target/release/examples/bench
	target/release/examples/bench_pull
	target/release/examples/bench_ssh
	target/release/examples/bench_net
	target/release/examples/bench_snap
	@scripts/install-e2b-sdks.sh
	target/release/examples/bench_e2b

# Release build, then hutchd, hutch and hutch-agent (beside hutchd, where hutchd looks for it),
# the systemd unit (its /usr/local/bin paths rewritten to BINDIR) and shell completions.
# Runtime packages (QEMU, erofs-utils, ...) come from `make deps`.
install: build
	$(MAKE) --no-print-directory install-files
	@if [ -z "$(DESTDIR)" ]; then echo "installed; start hutchd at boot with: systemctl daemon-reload && systemctl enable --now hutchd"; fi

install-files:
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(SYSTEMDUNITDIR) $(DESTDIR)$(BASHCOMPDIR) \
		$(DESTDIR)$(ZSHCOMPDIR) $(DESTDIR)$(FISHCOMPDIR)
	install -m 0755 $(BIN_DIR)/hutchd $(BIN_DIR)/hutch $(DESTDIR)$(BINDIR)/
	install -m 0755 $(AGENT) $(DESTDIR)$(BINDIR)/hutch-agent
	sed 's|/usr/local/bin/|$(BINDIR)/|g' dist/systemd/hutchd.service >$(DESTDIR)$(SYSTEMDUNITDIR)/hutchd.service
	chmod 0644 $(DESTDIR)$(SYSTEMDUNITDIR)/hutchd.service
	$(BIN_DIR)/hutch completions bash >$(DESTDIR)$(BASHCOMPDIR)/hutch
	$(BIN_DIR)/hutch completions zsh >$(DESTDIR)$(ZSHCOMPDIR)/_hutch
	$(BIN_DIR)/hutch completions fish >$(DESTDIR)$(FISHCOMPDIR)/hutch.fish

# Removes what install put in place; hutchd's data (/var/lib/hutch) and running VMs stay.
uninstall:
	rm -f $(addprefix $(DESTDIR),$(INSTALLED))

# The control plane alone: the real service on the redb store over the fake VMM and agents
# (docs/benchmarks.md). HUTCH_BENCH_STORE=memory for the in-memory baseline.
bench-control:
	cargo build --release -p hutch-daemon --features fakes --example bench_control
	target/release/examples/bench_control

# The cluster's store against the single node's, dead-node detection, and live migration
# (docs/benchmarks.md).
bench-cluster: build
	@scripts/install-deps.sh --test
	cargo build --release -p hutch-daemon --features fakes --example bench_cluster
	cargo build --release -p hutch --example bench_migrate --example bench_front
	target/release/examples/bench_cluster
	target/release/examples/bench_migrate
	target/release/examples/bench_front
