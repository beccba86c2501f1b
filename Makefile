# `make run` serves on PORT (8080); `make test` runs every test. Both need only the Rust toolchain.
VERSION ?= local
PORT ?= 8080
LINT_TOOLS := target/lint-tools

.PHONY: build run test lint clean

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

clean:
	cargo clean
