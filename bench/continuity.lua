-- bench/continuity's wrk script: every response's start and end (CLOCK_MONOTONIC, in µs, as
-- systemd's timestamps) and status, per thread, so that the bench can tell the requests that
-- overlapped an upgrade's window from the others. One connection per thread (-t N -c N):
-- request() and response() then alternate.
local ffi = require("ffi")
ffi.cdef [[
  struct timespec { long tv_sec; long tv_nsec; };
  int clock_gettime(int clk_id, struct timespec *tp);
]]
local ts = ffi.new("struct timespec")
local function now_us()
  ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) * 1000000 + math.floor(tonumber(ts.tv_nsec) / 1000)
end

local threads = {}
function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  log = {}
  started = 0
  out = args[1]
end

function request()
  started = now_us()
  return wrk.format("GET", "/")
end

function response(status, headers, body)
  log[#log + 1] = string.format("%d %d %d", started, now_us(), status)
end

function done(summary, latency, requests)
  local f = io.open(threads[1]:get("out"), "w")
  for _, thread in ipairs(threads) do
    for _, line in ipairs(thread:get("log")) do
      f:write(line, "\n")
    end
  end
  local e = summary.errors
  f:write(string.format("# requests %d connect %d read %d write %d status %d timeout %d\n",
    summary.requests, e.connect, e.read, e.write, e.status, e.timeout))
  f:close()
end
