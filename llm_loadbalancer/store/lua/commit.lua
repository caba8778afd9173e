-- commit: store a choice made from the snapshot of `version`, if nothing changed since.
-- ARGV[1]  the balancer's key prefix
-- ARGV[2]  the choice, JSON:
--   version   the version the choice was made from
--   buckets   {bucket prefix: its version then} of the buckets the snapshot read
--   position  the new rotation position, or absent
--   member    the member whose request is counted (its ticket), or absent
--   bucket    with member: the prefix of its bucket, when its request counts against limits
--   declare   with bucket: {source, 'rpm|rpd|tpm|tpd|at'}: the member's own limits, or absent
--   reserve   with bucket: 'tokens|blind|lease' reserved for the prompt under a token limit, or
--             absent
--   probe     with member: {its cooldown field read, the field of its probe}, or absent
--   flight    with member: 'lease|at' of the request in flight (least-busy), or absent
--   redate    {{member, the cooldown field read, the field to store instead}, ...}, or absent
--   now       the time of the choice ('%.6f')
--   keep      seconds a balancer's keys are kept without use
--   stale     seconds after which a prompt in flight no longer counts
--   format    this code's format of the keys (stored when the server has none)
-- ARGV[3]  what to read afterwards: JSON, the `want` of snapshot()
-- Returns {0, a new snapshot} when a version moved since; else {1, the ticket or '', the
-- snapshot after it}.
local p, c, want = ARGV[1], cjson.decode(ARGV[2]), cjson.decode(ARGV[3])
local moved = (redis.call('GET', p .. 'version') or '0') ~= c.version
for bp, version in pairs(c.buckets) do
  if (redis.call('GET', bp .. 'version') or '0') ~= version then moved = true end
end
if moved then
  return {0, snapshot(p, want)}
end
redis.call('SETNX', 'llm-lb:format', c.format)
local keep = c.keep
bump(p, keep)
if c.position then
  redis.call('HSET', p .. 'rotation', 'position', string.format('%d', c.position))
  redis.call('EXPIRE', p .. 'rotation', keep)
end
if c.redate then
  for _, r in ipairs(c.redate) do
    local m = string.format('%d', r[1])
    if redis.call('HGET', p .. 'cooldowns', m) == r[2] then
      redis.call('HSET', p .. 'cooldowns', m, r[3])
    end
  end
end
local ticket = ''
if c.member then
  local m, now = string.format('%d', c.member), c.now
  ticket = tostring(redis.call('INCR', 'llm-lb:2:ids'))
  if c.probe and redis.call('HGET', p .. 'cooldowns', m) == c.probe[1] then
    redis.call('HSET', p .. 'cooldowns', m, c.probe[2])
  end
  if c.bucket then
    local requests = c.bucket .. 'requests'
    redis.call('ZADD', requests, now, ticket)
    redis.call('ZREMRANGEBYSCORE', requests, '-inf', string.format('%.6f', tonumber(now) - 86400))
    redis.call('EXPIRE', requests, keep)
    if c.reserve then
      local tokens, blind, lease = string.match(c.reserve, '^([^|]*)|([^|]*)|(.*)$')
      put_dated(c.bucket .. 'reserved', ticket, tokens .. '|' .. blind .. '|' .. now .. '|' .. lease,
        now, tonumber(now) - c.stale, keep)
    end
    if c.declare then
      redis.call('HSET', c.bucket .. 'limits', c.declare[1], c.declare[2])
      redis.call('EXPIRE', c.bucket .. 'limits', keep)
    end
    bump(c.bucket, keep)
  end
  if c.flight then
    put_dated(p .. 'flight', ticket, m .. '|' .. c.flight, now, tonumber(now) - c.stale, keep)
  end
end
return {1, ticket, snapshot(p, want)}
