# kickstart's own targets, as a template: cargo generate leaves this file out of a new project.
.PHONY: template template-check bench bench-cpu bench-instructions
# Files that name the package where cargo generate cannot reach: it writes X from the twin X.liquid.
# The README's twin leaves out the sections marked template-only.
# Metric names take the crate's name, `my_service` for `my-service`: Prometheus allows no `-`.
TWINS := Cargo.toml Cargo.lock README.md deploy/kubernetes.yaml fluent-bit.yaml openapi.yaml
TWIN := perl -0pe 's/<!-- template-only -->.*?<!-- \/template-only -->\n//gs; \
  s/(?<=metric_namespace: )$(BIN)\b|$(BIN)(?=_http_)/{{crate_name}}/g; s/$(BIN)(?!\.go)/{{project-name}}/g'

template:
	for file in $(TWINS); do $(TWIN) $$file > $$file.liquid; done

# main.rs is under 500 lines (the template's budget; a generated project's main.rs is its owner's),
# the twins are current, and a project generated under another name (from a copy without target/)
# names itself, carries no template syntax, has the same workflows, builds as the Dockerfile does,
# passes its linters (its workflows and its manifest with its name) and its tests. It shares target/
# and the linters, so only the crate is rebuilt.
MAX_LINES := 500
template-check: $(LINTERS) $(CARGO_DENY)
	@lines=$$(wc -l < main.rs); if [ $$lines -ge $(MAX_LINES) ]; then \
	  echo "main.rs has $$lines lines: the template keeps it under $(MAX_LINES); make room for what you add"; exit 1; fi
	command -v cargo-generate >/dev/null || cargo install --locked cargo-generate --version 0.23.14
	for file in $(TWINS); do $(TWIN) $$file | cmp -s - $$file.liquid || \
	  { echo "$$file.liquid is stale: run make template"; exit 1; }; done
	work=$$(mktemp -d) && trap 'rm -rf "$$work"' EXIT && mkdir "$$work/template" && \
	tar -c --exclude=./target --exclude=./.git . | tar -x -C "$$work/template" && \
	cargo generate --path "$$work/template" --name my-service --destination "$$work" --vcs none --silent && \
	cd "$$work/my-service" && \
	if grep -rIi $(BIN) . | grep -v '$(BIN)\.go'; then echo "the lines above still say $(BIN)"; exit 1; fi && \
	if grep -lE '\{[{%]|<!-- *-->|^#$$' $(TWINS) Makefile .ci/run; then echo "template syntax left in these"; exit 1; fi && \
	diff -r $(CURDIR)/.github .github && \
	CARGO_TARGET_DIR=$(CURDIR)/target $(MAKE) LINT_TOOLS=$(CURDIR)/$(LINT_TOOLS) lint install DEST="$$work/service" test

# The benchmark of bench/ (its header says what it measures), on the release build: not run by CI,
# as the figures depend on the machine. BASELINE: binaries to count instructions of alongside, such
# as a copy of the build from before a change.
bench: build
	bench/bench.sh all $(RELEASE_BIN) $(BASELINE)

# The CPU time the server spends per GET /health at 64 connections (user + system, from /proc),
# steadier than req/s on shared cores: the release build next to the binaries in BASELINE,
# interleaved, ROUNDS rounds of 5 s. Keep a copy of the build before a change to put in BASELINE.
ROUNDS ?= 5
bench-cpu: build
	port=18200; pids=; for bin in $(RELEASE_BIN) $(BASELINE); do \
	  PORT=$$port $$bin >/dev/null & pids="$$pids $$!"; port=$$((port + 1)); done; \
	trap "kill $$pids" EXIT; sleep 1; cpu() { awk '{print $$14 + $$15}' /proc/$$1/stat; }; \
	for round in $$(seq $(ROUNDS)); do port=18200; for pid in $$pids; do \
	  url=http://127.0.0.1:$$port/health; port=$$((port + 1)); wrk -t2 -c64 -d1s $$url >/dev/null; \
	  before=$$(cpu $$pid); requests=$$(wrk -t2 -c64 -d5s $$url | awk '/requests in/ {print $$1}'); \
	  awk -v ticks=$$(($$(cpu $$pid) - before)) -v requests=$$requests -v hz=$$(getconf CLK_TCK) \
	    -v exe=$$(readlink /proc/$$pid/exe) -v round=$$round \
	    'BEGIN {printf "round %d %s: %.1f us a request\n", round, exe, ticks * 1e6 / hz / requests}'; \
	done; done

# The instructions per keep-alive GET /health under callgrind, for the release build, the floor and
# each binary in BASELINE: exact and repeatable, where CPU time on shared cores moves by a fifth.
REQUESTS ?= 2000
bench-instructions: build
	REQUESTS=$(REQUESTS) bench/bench.sh instructions $(RELEASE_BIN) $(BASELINE)
