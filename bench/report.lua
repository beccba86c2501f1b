-- wrk script of bench.sh: POSTs the file named after `--` as the body when there is one, and
-- prints one line for bench.sh: requests per second, p50 and p99 in ms, and errors.
function init(args)
  if args[1] then
    local file = assert(io.open(args[1], "rb"))
    wrk.method = "POST"
    wrk.body = file:read("*a")
    file:close()
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %.2f %.3f %.3f %d\n", summary.requests / summary.duration * 1e6,
    latency:percentile(50) / 1e3, latency:percentile(99) / 1e3,
    e.connect + e.read + e.write + e.status + e.timeout))
end
