-- finish: a prompt that ended without an outcome (the caller stopped reading) is no longer in
-- flight, and its reservation is freed; or, with a lease, it still runs: its leases are renewed.
-- ARGV[1]  the balancer's key prefix
-- ARGV[2]  its ticket
-- ARGV[3]  seconds a balancer's keys are kept without use
-- ARGV[4]  the prefix of its member's bucket when it holds a reservation there, else ''
-- ARGV[5]  absent or '' to end it; else the seconds its lease lasts from now
-- ARGV[6]  the time ('%.6f'), or absent or '': the server's
-- ARGV[7]  the member whose probe it is, or '' or absent: renewed with ARGV[5]; else it ended
--          without an outcome, and the member is due a probe again from now
local p, ticket, keep, bp = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local probed = ARGV[7] or ''
local now = tonumber(ARGV[6] or '')
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
if ARGV[5] and ARGV[5] ~= '' then
  local lease = string.format('%.6f', now + tonumber(ARGV[5]))
  local entry = redis.call('HGET', p .. 'flight', ticket)
  if entry then
    local member, at = string.match(entry, '^([^|]*)|[^|]*|(.*)$')
    if member then
      redis.call('HSET', p .. 'flight', ticket, member .. '|' .. lease .. '|' .. at)
      bump(p, keep)
    end
  end
  if probed ~= '' and probe_ends(p, probed, lease) then bump(p, keep) end
  if bp ~= '' then
    local held = redis.call('HGET', bp .. 'reserved', ticket)
    if held then
      local tokens, blind, at = string.match(held, '^([^|]*)|([^|]*)|([^|]*)|')
      if tokens then
        redis.call('HSET', bp .. 'reserved', ticket, tokens .. '|' .. blind .. '|' .. at .. '|' .. lease)
        bump(bp, keep)
      end
    end
  end
  return 1
end
if probed ~= '' and probe_ends(p, probed, string.format('%.6f', now)) then bump(p, keep) end
if redis.call('HDEL', p .. 'flight', ticket) == 1 then
  redis.call('ZREM', p .. 'flight_at', ticket)
  bump(p, keep)
end
if bp ~= '' and redis.call('HDEL', bp .. 'reserved', ticket) == 1 then
  redis.call('ZREM', bp .. 'reserved_at', ticket)
  bump(bp, keep)
end
return 1
