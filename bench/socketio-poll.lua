-- wrk script for the Socket.IO benchmark's long-polling runs
-- (bench/socketio.sh): engine.io v4 long-poll GETs with POLL_KEYS session
-- keys (k01, k02, ...), each with its own sid, taken in turn request by
-- request (wrk's scripts cannot tell one connection from another, so the
-- keys rotate per request, not per connection), and one JSON line with the
-- totals on stdout when the run is done.

local keys = tonumber(os.getenv("POLL_KEYS") or "50")
local prefix = os.getenv("POLL_PATH") or "/socket.io/"
local requests = {}
local next_request = 0

init = function(args)
   for i = 1, keys do
      local path = string.format(
         "%s?EIO=4&transport=polling&session=k%02d&sid=benchSid%012d", prefix, i, i)
      requests[i] = wrk.format("GET", path)
   end
end

request = function()
   next_request = next_request % keys + 1
   return requests[next_request]
end

done = function(summary, latency, _)
   local e = summary.errors
   io.write(string.format(
      '{"mode":"poll","requests":%d,"duration_us":%d,"bytes":%d,' ..
      '"requests_per_s":%.1f,' ..
      '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
      '"latency_us":{"p50":%d,"p99":%d,"p99_9":%d,"max":%d,"mean":%.1f}}\n',
      summary.requests, summary.duration, summary.bytes,
      summary.requests / (summary.duration / 1e6),
      e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(99), latency:percentile(99.9),
      latency.max, latency.mean))
end
