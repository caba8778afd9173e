-- commit: store a choice made from the snapshot of `version`, if nothing changed since.
-- ARGV[1]  the balancer's key prefix
-- ARGV[2]  the choice, JSON:
--   version   the version the choice was made from
--   position  the new rotation position, or absent
--   member    the member whose request is counted (its ticket), or absent
--   flight    true: the request is in flight until it ends (least-busy)
--   host, pid where the request is in flight
--   now       the time of the choice ('%.6f')
--   keep      seconds a balancer's keys are kept without use
--   stale     seconds after which a prompt in flight no longer counts (its process was killed)
-- ARGV[3]  what to read afterwards: JSON, the `want` of snapshot()
-- Returns {0, a new snapshot} when the version moved since; else {1, the ticket or '', the
-- snapshot after it}.
local p, c, want = ARGV[1], cjson.decode(ARGV[2]), cjson.decode(ARGV[3])
if (redis.call('GET', p .. 'version') or '0') ~= c.version then
  return {0, snapshot(p, want)}
end
local keep = c.keep
bump(p, keep)
if c.position then
  redis.call('HSET', p .. 'rotation', 'position', string.format('%d', c.position))
  redis.call('EXPIRE', p .. 'rotation', keep)
end
local ticket = ''
if c.member then
  local m, now = string.format('%d', c.member), c.now
  ticket = tostring(redis.call('INCR', p .. 'ids'))
  redis.call('EXPIRE', p .. 'ids', keep)
  local requests = p .. 'requests:' .. m
  redis.call('ZADD', requests, now, ticket)
  redis.call('ZREMRANGEBYSCORE', requests, '-inf', string.format('%.6f', tonumber(now) - 86400))
  redis.call('EXPIRE', requests, keep)
  if c.flight then
    local entry = m .. '|' .. c.host .. '|' .. string.format('%d', c.pid) .. '|' .. now
    put_dated(p .. 'flight', ticket, entry, now, tonumber(now) - c.stale, keep)
  end
end
return {1, ticket, snapshot(p, want)}
