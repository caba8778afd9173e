-- bump(p, keep): a change that a choice depends on. The version never takes a value it had
-- before, even after a reset deleted it: a new one starts at the server's time in microseconds,
-- so that a choice made from an old snapshot is always refused.
local function bump(p, keep)
  local key = p .. 'version'
  if redis.call('EXISTS', key) == 0 then
    local t = redis.call('TIME')
    redis.call('SET', key, t[1] .. string.format('%06d', tonumber(t[2])))
  end
  redis.call('INCR', key)
  redis.call('EXPIRE', key, keep)
end

-- put_dated(key, field, value, at, older, keep): a field of a hash, with the time it was set in
-- the sorted set key_at, so that the fields set before `older` can be deleted, a hundred at a
-- time (a hash has no expiry per field).
local function put_dated(key, field, value, at, older, keep)
  local dates = key .. '_at'
  redis.call('HSET', key, field, value)
  redis.call('ZADD', dates, at, field)
  local old = string.format('%.6f', older)
  for _, gone in ipairs(redis.call('ZRANGEBYSCORE', dates, '-inf', old, 'LIMIT', 0, 100)) do
    redis.call('HDEL', key, gone)
    redis.call('ZREM', dates, gone)
  end
  redis.call('EXPIRE', key, keep)
  redis.call('EXPIRE', dates, keep)
end

-- probe_ends(p, m, ends): a member's probe (its cooldown of kind 2, rules.PROBING) ends at
-- `ends` ('%.6f'): renewed, or ended without a verdict (due a probe again from then); any
-- other cooldown is left as it is. True when it was a probe.
local function probe_ends(p, m, ends)
  local row = redis.call('HGET', p .. 'cooldowns', m)
  if not row then return false end
  local stated, rest = string.match(row, '^[^|]*|([^|]*)|(.*)$')
  if stated ~= '2' then return false end
  redis.call('HSET', p .. 'cooldowns', m, ends .. '|2|' .. rest)
  return true
end
