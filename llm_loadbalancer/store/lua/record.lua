-- record: how one attempt of a member ended.
-- ARGV[1]  the balancer's key prefix
-- ARGV[2]  the outcome, JSON:
--   member         the member's index
--   ticket         its request's ticket, or absent
--   error          "reason: message" of a failure, or absent for a success
--   cooldown       the cooldown's length in seconds (already escalated), or absent
--   expect         with a cooldown: the member's cooldown field as the length was computed
--                  from ('' for none); when it is no longer that, nothing is written
--   stated         true: the provider stated the cooldown (Retry-After, a quota's reset)
--   cooled         true: a success clears the member's cooldown
--   conversation   a success ties it to the member (its first member is kept), or absent
--   prefix         a success makes the member this prompt prefix's ('prefix:' and its
--                  digest), or absent
--   affinity       with prefix: seconds after which a prefix unused is forgotten
--   tokens_in, tokens_out, items
--   first_chunk, total   seconds ('%.6f'), or absent
--   streamed       true or false
--   bucket         the prefix of the member's bucket, when its tokens count against limits
--                  or it holds a reservation there
--   spent          the tokens to count against its bucket's limits (``rules.spent``)
--   detail         with spent: ':estimate:output' of a report ('::' when not known)
--   reservation    the ticket whose reservation in the bucket ends, or absent
--   probe          true: the attempt was the member's probe (a success clears its cooldown;
--                  an error that calls for none leaves it due a probe again from now)
--   now            the time ('%.6f'), or absent: the server's
--   keep           seconds a balancer's keys (and a conversation's tie) are kept without use
--   timings_kept   how many timings are kept per member
-- ARGV[3]  what to read afterwards: JSON, the `want` of snapshot(); or absent
-- Returns {0, the cooldown field now} when `expect` is not it; else {1, the snapshot or 0}.
local p, o = ARGV[1], cjson.decode(ARGV[2])
local m = string.format('%d', o.member)
local cooldowns = p .. 'cooldowns'
if o.cooldown then
  local row = redis.call('HGET', cooldowns, m) or ''
  if row ~= o.expect then return {0, row} end
end
local now = tonumber(o.now)
if not o.now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local at = string.format('%.6f', now)
local keep = o.keep
local ok = not o.error
local stats = p .. 'stats'
redis.call('HINCRBY', stats, m .. ':requests', 1)
if ok then
  redis.call('HINCRBY', stats, m .. ':successes', 1)
else
  redis.call('HINCRBY', stats, m .. ':failures', 1)
  redis.call('HSET', stats, m .. ':last_error', o.error)
end
redis.call('HSET', stats, m .. ':last_used', at)
redis.call('HINCRBY', stats, m .. ':input_tokens', o.tokens_in)
redis.call('HINCRBY', stats, m .. ':output_tokens', o.tokens_out)
redis.call('HINCRBY', stats, m .. ':items', o.items)
redis.call('EXPIRE', stats, keep)
local timings = p .. 'timings:' .. m
local streamed = '0'
if o.streamed then streamed = '1' end
redis.call('LPUSH', timings, at .. '|' .. (o.first_chunk or '') .. '|' .. (o.total or '') .. '|' .. streamed)
redis.call('LTRIM', timings, 0, o.timings_kept - 1)
redis.call('EXPIRE', timings, keep)
local spent = o.spent or 0
local changed = false  -- what a choice depends on: tokens against a limit, cooldowns, ties
if o.bucket and o.reservation then
  if redis.call('HDEL', o.bucket .. 'reserved', o.reservation) == 1 then
    redis.call('ZREM', o.bucket .. 'reserved_at', o.reservation)
    bump(o.bucket, keep)
  end
end
if o.bucket and spent > 0 then
  bump(o.bucket, keep)
  local key = o.bucket .. 'spent'
  local top = redis.call('ZREVRANGE', key, 0, 0, 'WITHSCORES')
  local cum, when = spent, now
  if #top > 0 then
    cum = tonumber(string.match(top[1], '^(%d+)')) + spent
    when = math.max(now, tonumber(top[2]))
  end
  redis.call('ZADD', key, string.format('%.6f', when),
    string.format('%020d:%d', cum, spent) .. (o.detail or ''))
  redis.call('ZREMRANGEBYSCORE', key, '-inf', string.format('%.6f', now - 86400))
  redis.call('EXPIRE', key, keep)
end
if o.ticket and redis.call('HDEL', p .. 'flight', o.ticket) == 1 then
  redis.call('ZREM', p .. 'flight_at', o.ticket)
  changed = true
end
if o.cooldown then
  local stated = '0'
  if o.stated then stated = '1' end
  redis.call('HSET', cooldowns, m, string.format('%.6f', now + o.cooldown) .. '|' .. stated
    .. '|' .. string.format('%.6f', o.cooldown) .. '|' .. (o.error or ''))
  redis.call('EXPIRE', cooldowns, keep)
  changed = true
elseif ok and (o.cooled or o.probe) then
  if redis.call('HDEL', cooldowns, m) == 1 then changed = true end
elseif o.probe then
  if probe_ends(p, m, at) then changed = true end
end
if ok and o.conversation then
  local ties = p .. 'ties'
  local first = m
  local row = redis.call('HGET', ties, o.conversation)
  if row then first = string.match(row, '^(%d+)') end
  put_dated(ties, o.conversation, first .. '|' .. m .. '|' .. at, at, now - keep, keep)
  changed = true
end
if ok and o.prefix then
  put_dated(p .. 'prefixes', o.prefix, m .. '|' .. m .. '|' .. at, at, now - o.affinity, keep)
  changed = true
end
if changed then
  bump(p, keep)
end
if ARGV[3] then return {1, snapshot(p, cjson.decode(ARGV[3]))} end
return {1, 0}
