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

# The instructions the server spends per keep-alive GET /health, counted by valgrind's callgrind
# over REQUESTS requests less an idle run, for the release build and each binary in BASELINE:
# exact and repeatable, where CPU time on shared cores moves by a fifth between rounds.
REQUESTS ?= 2000
bench-instructions: build
	@port=18250; for bin in $(RELEASE_BIN) $(BASELINE); do port=$$((port + 1)); \
	  urls=$$(mktemp); for _ in $$(seq $(REQUESTS)); do \
	    printf 'url = "http://127.0.0.1:%s/health"\noutput = "/dev/null"\n' $$port; done >$$urls; \
	  for requests in 0 $(REQUESTS); do out=$$(mktemp); \
	    PORT=$$port valgrind --tool=callgrind --callgrind-out-file=$$out $$bin >/dev/null 2>&1 & pid=$$!; \
	    until curl -sf -o /dev/null localhost:$$port/health; do sleep 0.2; done; \
	    if [ $$requests -gt 0 ]; then curl -s -K $$urls; fi; kill -INT $$pid; wait $$pid; \
	    eval "ir_$$requests=$$(awk '/^summary:/ {print $$2}' $$out)"; rm -f $$out; done; rm -f $$urls; \
	  echo "$$(readlink -f $$bin): $$(( (ir_$(REQUESTS) - ir_0) / $(REQUESTS) )) instructions a GET /health"; \
	done
