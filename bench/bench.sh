#!/usr/bin/env bash
# kickstart's benchmark (`make bench`): the release build next to sharp on POST /resize, next to a
# bare hyper server (the floor) and, given KICKSTART_GO_BIN, kickstart.go on GET /health, and the
# instructions per GET /health under callgrind. Rounds are interleaved and the tables give medians.
# Loopback only, every run of a fixed length; every server started here is stopped by its PID when
# the script ends, Ctrl-C included.
#
#   bench/bench.sh all BINARY [BASELINE...]    resize, health and instructions: what make bench runs
#   bench/bench.sh resize BINARY | health BINARY | instructions BINARY [BASELINE...]
#
# ROUNDS (3) rounds of DURATION (5s) per case and server; REQUESTS (2000) keep-alive requests per
# callgrind count. Needs cargo, curl, wrk, node and npm, valgrind; installs sharp (bench/sharp's
# lock file) and builds the floor (bench/floor) under target/bench.
set -euo pipefail
cd "$(dirname "$0")/.."
part=${1:?usage: bench/bench.sh all|resize|health|instructions BINARY [BASELINE...]}
binary=$(realpath "${2:?usage: bench/bench.sh $part BINARY [BASELINE...]}")
shift 2
ROUNDS=${ROUNDS:-3} DURATION=${DURATION:-5s} REQUESTS=${REQUESTS:-2000}
work=target/bench
mkdir -p "$work"
results=$(mktemp)
pids=()
stop_servers() {
  if ((${#pids[@]})); then kill "${pids[@]}" 2>/dev/null || true; wait "${pids[@]}" 2>/dev/null || true; fi
  pids=()
}
trap 'stop_servers; rm -f "$results"' EXIT
trap 'exit 130' INT TERM

missing=()
for tool in cargo curl wrk node npm valgrind; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if ((${#missing[@]})); then
  echo "bench: missing ${missing[*]}; on Debian: apt-get install wrk nodejs npm valgrind curl" >&2
  exit 1
fi
[ -x "$binary" ] || { echo "bench: $binary is not an executable" >&2; exit 1; }

floor=$work/floor/release/floor
build_floor() {
  cargo build --quiet --release --locked --manifest-path bench/floor/Cargo.toml --target-dir "$work/floor"
}

install_sharp() {
  mkdir -p "$work/sharp"
  cp bench/sharp/package.json bench/sharp/package-lock.json bench/sharp/server.js "$work/sharp/"
  (cd "$work/sharp" && npm ci --silent --no-audit --no-fund)
}

# start NAME PORT COMMAND...: starts a server on 127.0.0.1:PORT, its stdout discarded (as a log
# collector would take it), and waits up to 30 s (callgrind is slow) for its GET /health.
start() {
  local name=$1 port=$2
  shift 2
  PORT=$port "$@" >/dev/null 2>"$work/$name.err" &
  pids+=($!)
  for _ in $(seq 300); do
    curl -sf -o /dev/null --max-time 1 "http://127.0.0.1:$port/health" && return 0
    sleep 0.1
  done
  echo "bench: $name did not answer on port $port: $(cat "$work/$name.err")" >&2
  exit 1
}

# measure NAME PID CASE C URL [BODY_FILE]: one wrk run; appends its figures and the server's peak
# RSS (VmHWM, reset to the current RSS first) to the results.
measure() {
  local name=$1 pid=$2 case=$3 c=$4 url=$5 body=${6:-} threads=$(($4 < 2 ? $4 : 2)) out
  echo 5 >"/proc/$pid/clear_refs"
  out=$(wrk -t"$threads" -c"$c" -d"$DURATION" --timeout 30s --latency -s bench/report.lua "$url" -- ${body:+"$body"})
  local figures
  figures=$(grep '^RESULT ' <<<"$out") || { echo "bench: wrk failed on $url: $out" >&2; exit 1; }
  local rss_kib
  rss_kib=$(awk '/^VmHWM:/ {print $2}' "/proc/$pid/status")
  echo "$case $c $name ${figures#RESULT } $((rss_kib / 1024))" >>"$results"
}

# The medians over rounds of each (case, c, server), in the order measured, as `case c server
# req/s p50 p99 errors peak-MiB`.
medians() {
  awk '
    function median(list,   v, n, i, j, x) {
      n = split(list, v, " ")
      for (i = 2; i <= n; i++) { x = v[i] + 0; for (j = i - 1; j > 0 && v[j] + 0 > x; j--) v[j + 1] = v[j]; v[j + 1] = x }
      return n % 2 ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
    }
    { key = $1 " " $2 " " $3; if (!(key in rps)) order[++keys] = key
      rps[key] = rps[key] " " $4; p50[key] = p50[key] " " $5; p99[key] = p99[key] " " $6
      errors[key] += $7; if ($8 > rss[key]) rss[key] = $8 }
    END { for (i = 1; i <= keys; i++) { k = order[i]
      printf "%s %.1f %.2f %.2f %d %d\n", k, median(rps[k]), median(p50[k]), median(p99[k]), errors[k], rss[k] } }' "$results"
}

resize() {
  install_sharp
  : >"$results"
  # Fresh servers for each photo, so that a peak RSS is this photo's, not what an earlier one left.
  for case in bench/photos/photo-4000x3000.jpg:800 testdata/photo-1920x1080.jpg:400 \
    bench/photos/photo-alpha-1500x1000.png:400; do
    start kickstart 18300 "$binary"
    start sharp 18301 node "$work/sharp/server.js"
    local kickstart_pid=${pids[0]} sharp_pid=${pids[1]}
    local photo=${case%:*} side=${case#*:}
    local query="/resize?width=$side&height=$side" name
    name="$(basename "$photo" | sed 's/^photo-//')→$side"
    for port in 18300 18301; do
      local type
      type=$(curl -sf --max-time 60 --data-binary "@$photo" -o /dev/null -w '%{content_type}' "http://127.0.0.1:$port$query")
      [[ $type == image/* ]] || { echo "bench: port $port answered $type to $name" >&2; exit 1; }
    done
    for c in 1 2 8; do
      for _ in $(seq "$ROUNDS"); do
        measure kickstart "$kickstart_pid" "$name" "$c" "http://127.0.0.1:18300$query" "$photo"
        measure sharp "$sharp_pid" "$name" "$c" "http://127.0.0.1:18301$query" "$photo"
      done
    done
    stop_servers
  done
  echo "POST /resize, medians of $ROUNDS rounds of $DURATION; ratio = kickstart's req/s ÷ sharp's"
  echo
  echo "| image → box | c | kickstart req/s | sharp req/s | ratio | p50 ms (kickstart / sharp) | p99 ms (kickstart / sharp) | peak RSS MiB (kickstart / sharp) |"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- |"
  medians | paste -d' ' - - | awk '{
    printf "| %s | %s | %.1f | %.1f | %.2f | %.1f / %.1f | %.1f / %.1f | %d / %d |\n", $1, $2, $4, $12, $4 / $12, $5, $13, $6, $14, $8, $16
    errors += $7 + $15 } END { if (errors) printf "\n%d requests failed\n", errors }'
  echo
}

health() {
  build_floor
  : >"$results"
  start kickstart 18310 "$binary"
  start floor 18311 "$floor"
  local servers=("kickstart ${pids[0]} 18310" "floor ${pids[1]} 18311")
  if [ -n "${KICKSTART_GO_BIN:-}" ]; then
    start kickstart.go 18312 "$KICKSTART_GO_BIN"
    servers+=("kickstart.go ${pids[2]} 18312")
  fi
  for c in 64 1; do
    for _ in $(seq "$ROUNDS"); do
      for server in "${servers[@]}"; do
        read -r name pid port <<<"$server"
        measure "$name" "$pid" GET-/health "$c" "http://127.0.0.1:$port/health"
      done
    done
  done
  stop_servers
  echo "GET /health, every request logged (stdout to /dev/null); medians of $ROUNDS rounds of $DURATION"
  echo
  echo "| c | server | req/s | ÷ floor | p50 ms | p99 ms | peak RSS MiB |"
  echo "| --- | --- | --- | --- | --- | --- | --- |"
  medians | awk '{ rps[$2, $3] = $4; line[++n] = $0 }
    END { for (i = 1; i <= n; i++) { split(line[i], f, " ")
      printf "| %s | %s | %.0f | %.2f | %.2f | %.2f | %d |\n", f[2], f[3], f[4], f[4] / rps[f[2], "floor"], f[5], f[6], f[8] } }'
  echo
}

# The instructions a server spends per keep-alive GET /health: callgrind's count over REQUESTS
# requests less an idle run's, exact where wall-clock figures move with the machine's load.
instructions() {
  build_floor
  local urls
  urls=$(mktemp)
  echo "Instructions per keep-alive GET /health (callgrind, $REQUESTS requests less an idle run)"
  echo
  for bin in "$binary" "$floor" "$@"; do
    for _ in $(seq "$REQUESTS"); do printf 'url = "http://127.0.0.1:18320/health"\noutput = "/dev/null"\n'; done >"$urls"
    local counts=()
    for requests in 0 "$REQUESTS"; do
      local out
      out=$(mktemp)
      start callgrind 18320 valgrind --tool=callgrind --callgrind-out-file="$out" "$bin"
      if ((requests)); then curl -s -K "$urls"; fi
      kill -INT "${pids[0]}"
      wait "${pids[0]}" || true
      pids=()
      counts+=("$(awk '/^summary:/ {print $2}' "$out")")
      rm -f "$out"
    done
    echo "- $(realpath "$bin"): $(((counts[1] - counts[0]) / REQUESTS))"
  done
  rm -f "$urls"
  echo
}

echo "# make bench, $(date -u +%FT%TZ): $(nproc) cores ($(lscpu | sed -n 's/^Model name: *//p')), load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo
case $part in
  all) resize; health; instructions "$@" ;;
  resize | health | instructions) "$part" "$@" ;;
  *) echo "bench: no part $part: all, resize, health or instructions" >&2; exit 2 ;;
esac
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
