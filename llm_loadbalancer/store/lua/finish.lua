-- finish: a prompt that ended without an outcome (the caller stopped reading) is no longer in
-- flight; or, with a lease, it still runs: its lease is renewed.
-- ARGV[1]  the balancer's key prefix
-- ARGV[2]  its ticket
-- ARGV[3]  seconds a balancer's keys are kept without use
-- ARGV[4]  absent to end it; else the seconds its lease lasts from now
-- ARGV[5]  with ARGV[4]: the time ('%.6f'), or absent: the server's
local p, ticket = ARGV[1], ARGV[2]
if ARGV[4] then
  local entry = redis.call('HGET', p .. 'flight', ticket)
  if entry then
    local now = tonumber(ARGV[5])
    if not now then
      local t = redis.call('TIME')
      now = tonumber(t[1]) + tonumber(t[2]) / 1000000
    end
    local member, at = string.match(entry, '^([^|]*)|[^|]*|(.*)$')
    local lease = string.format('%.6f', now + tonumber(ARGV[4]))
    redis.call('HSET', p .. 'flight', ticket, member .. '|' .. lease .. '|' .. at)
    bump(p, tonumber(ARGV[3]))
  end
  return 1
end
if redis.call('HDEL', p .. 'flight', ticket) == 1 then
  redis.call('ZREM', p .. 'flight_at', ticket)
  bump(p, tonumber(ARGV[3]))
end
return 1
