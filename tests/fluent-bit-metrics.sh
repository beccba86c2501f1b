#!/usr/bin/env bash
# Checks the metrics that the shipped Fluent Bit pipeline (fluent-bit.yaml) derives from the access
# lines: runs the binary, and Fluent Bit over its stdout, sends a known mix of requests twice, and
# compares what the exporter (port 2021) serves with what was sent: every count, each histogram's
# count against the counter, and no new series from a second scan of random paths and methods.
# Needs curl and Fluent Bit 4 or later (FLUENT_BIT, default fluent-bit); runs promtool when it is
# there (Debian's prometheus package). Not in make test: CI has no Fluent Bit. `make metrics-check`
# builds the release binary and runs this on it.
set -euo pipefail
binary=${1:?usage: tests/fluent-bit-metrics.sh BINARY}
fluent_bit=${FLUENT_BIT:-fluent-bit}
cd "$(dirname "$0")/.."
prefix=$(sed -n 's/^ *metric_namespace: //p' fluent-bit.yaml | head -n 1)_http
work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }

PORT=0 "$binary" >"$work/service.log" &
pids+=($!)
# The first line says that the server listens, and on which port: PORT=0 lets the system choose.
for _ in $(seq 100); do
  port=$(sed -n '1s/.*"port":\([0-9]*\).*/\1/p' "$work/service.log")
  [ -n "$port" ] && break
  sleep 0.1
done
[ -n "$port" ] || fail "the service did not start: $(cat "$work/service.log")"
LOG_PATH="$work/service.log" "$fluent_bit" -c fluent-bit.yaml >"$work/fluent-bit.out" 2>&1 &
pids+=($!)

base=http://127.0.0.1:$port
send() { curl -s -o /dev/null --max-time 10 "$@"; }
# One round of the mix: routes, a 405, made-up methods, resizes, and a scan of random paths.
# $1 numbers the made-up methods, so that each round uses new ones.
send_mix() {
  for _ in $(seq 10); do send "$base/health"; done
  for _ in $(seq 3); do send -I "$base/health"; done
  for _ in $(seq 2); do send "$base/openapi.yaml"; done
  send -X PUT "$base/health"
  for n in $(seq "$1" $(($1 + 19))); do send -X "BREW$n" "$base/openapi.yaml"; done
  for _ in $(seq 2); do send --data-binary @testdata/photo-1920x1080.jpg "$base/resize?width=100"; done
  send --data-binary @testdata/photo-1920x1080.jpg "$base/resize?width=0"
  for n in $(seq 300); do send "$base/scan-$RANDOM$RANDOM/$n?q=$RANDOM"; done
}
# Per round: 10 + 3 + 2 + 1 + 20 + 2 + 1 + 300 requests.
per_round=339

# The exporter's samples, one per line as `name{labels sorted} value`, so that label order is moot.
scrape() {
  curl -s --max-time 5 "http://127.0.0.1:2021/metrics" | awk '
    /^#/ || NF == 0 { next }
    {
      value = $NF; series = $0; sub(/ [^ ]*$/, "", series)
      name = series; labels = ""
      if (index(series, "{")) { name = substr(series, 1, index(series, "{") - 1)
        labels = substr(series, index(series, "{") + 1); sub(/}$/, "", labels) }
      n = split(labels, parts, ","); for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++)
        if (parts[j] < parts[i]) { t = parts[i]; parts[i] = parts[j]; parts[j] = t }
      sorted = ""; for (i = 1; i <= n; i++) sorted = sorted (i > 1 ? "," : "") parts[i]
      print name "{" sorted "} " value
    }'
}
total() { scrape | awk -v name="${prefix}_requests_total" 'index($0, name "{") == 1 {sum += $NF} END {print sum + 0}'; }
wait_for_total() {
  for _ in $(seq 300); do
    [ "$(total)" = "$1" ] && return 0
    sleep 0.1
  done
  fail "the exporter counts $(total) requests, not $1; Fluent Bit said: $(tail -n 20 "$work/fluent-bit.out")"
}
sample() { scrape | awk -v series="$1" 'index($0, series " ") == 1 {print $NF; found = 1} END {if (!found) print "none"}'; }
expect() {
  local got
  got=$(sample "$1")
  [ "$got" = "$2" ] || fail "$1 is $got, not $2"
  echo "ok  $1 = $2"
}

send_mix 0
wait_for_total "$per_round"
scrape | sed 's/ [^ ]*$//' | sort >"$work/series-1"
send_mix 20
wait_for_total $((2 * per_round))
scrape | sed 's/ [^ ]*$//' | sort >"$work/series-2"

requests=${prefix}_requests_total
expect "$requests{method=\"GET\",route=\"/health\",status=\"200\"}" 20
expect "$requests{method=\"HEAD\",route=\"/health\",status=\"200\"}" 6
expect "$requests{method=\"GET\",route=\"/openapi.yaml\",status=\"200\"}" 4
expect "$requests{method=\"PUT\",route=\"/health\",status=\"405\"}" 2
expect "$requests{method=\"OTHER\",route=\"/openapi.yaml\",status=\"405\"}" 40
expect "$requests{method=\"POST\",route=\"/resize\",status=\"200\"}" 4
expect "$requests{method=\"POST\",route=\"/resize\",status=\"400\"}" 2
expect "$requests{method=\"GET\",route=\"unmatched\",status=\"404\"}" 600
latency=${prefix}_request_duration_seconds
for route in /health /openapi.yaml /resize unmatched; do
  counted=$(scrape | awk -v name="$requests{" -v route="route=\"$route\"" \
    'index($0, name) == 1 && index($0, route) {sum += $NF} END {print sum + 0}')
  expect "${latency}_count{route=\"$route\"}" "$counted"
  expect "${latency}_bucket{le=\"+Inf\",route=\"$route\"}" "$counted"
done
series=$(wc -l <"$work/series-2")
diff "$work/series-1" "$work/series-2" >/dev/null ||
  fail "the second round added series: $(diff "$work/series-1" "$work/series-2" | grep '^>' | head -n 5)"
echo "ok  $series series after both rounds, none added by the second's 300 paths and 20 methods"
if command -v promtool >/dev/null; then
  curl -s --max-time 5 http://127.0.0.1:2021/metrics | promtool check metrics || fail "promtool check metrics"
  echo "ok  promtool check metrics finds nothing"
else
  echo "skipped: promtool check metrics (no promtool)"
fi
