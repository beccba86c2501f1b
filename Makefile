# `make run` serves on PORT (8080); `make test` runs every test. Both need only the Rust toolchain.
VERSION ?= local
PORT ?= 8080
BIN := $(shell sed -n 's/^name = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
LINT_TOOLS := target/lint-tools
# The load harness and reference servers (sharp, Pillow, kickstart.go) kept beside the repository.
BENCH ?= ../shared/bench

.PHONY: build run test lint bench clean

build:
	VERSION=$(VERSION) cargo build --release --locked

run:
	PORT=$(PORT) VERSION=$(VERSION) cargo run --locked

test:
	cargo test --locked

# Besides the Rust linters, checks that openapi.yaml is valid OpenAPI 3.1 (needs python3).
lint: $(LINT_TOOLS)/bin/openapi-spec-validator
	cargo fmt --check
	cargo clippy --locked --all-targets -- -D warnings
	$(LINT_TOOLS)/bin/openapi-spec-validator openapi.yaml

$(LINT_TOOLS)/bin/openapi-spec-validator:
	python3 -m venv $(LINT_TOOLS)
	$(LINT_TOOLS)/bin/pip install --quiet openapi-spec-validator==0.9.0

# The release build next to sharp (/resize) and, with KICKSTART_GO_BIN set, kickstart.go (/health):
# 3 interleaved rounds, medians and ratios. Not run by CI: the figures depend on the machine.
bench: build
	$(BENCH)/setup-peers.sh
	./target/release/$(BIN) >/dev/null & server=$$!; trap "kill $$server" EXIT; \
	until curl -sf localhost:$(PORT)/health >/dev/null; do sleep 0.1; done; \
	for case in "photo-4000x3000.jpg 800 800" "photo-1920x1080.jpg 400 400" "photo-alpha-1500x1000.png 400 400"; do \
	  ROUNDS=3 $(BENCH)/peers.sh -- $(BENCH)/resize-bench.sh \
	    "$(BIN)=http://127.0.0.1:$(PORT),sharp=http://127.0.0.1:18081" $(BENCH)/../testdata/$$case || exit 1; \
	done; \
	if [ -n "$$KICKSTART_GO_BIN" ]; then go=",go=http://127.0.0.1:18080" peers=--with-kickstart; fi; \
	ROUNDS=3 $(BENCH)/peers.sh --only-extra $$peers -- $(BENCH)/health-bench.sh "$(BIN)=http://127.0.0.1:$(PORT)$$go"

clean:
	cargo clean
