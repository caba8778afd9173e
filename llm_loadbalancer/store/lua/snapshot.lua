-- snapshot(p, want): what a choice needs of the balancer whose keys start with p, read at once.
-- want (a table, from JSON):
--   format        this code's format of the keys: a server holding a newer one is refused
--   members       the number of members
--   conversation  the conversation whose tie to read, or absent
--   prefix        the tie of a prompt prefix to read ('prefix:' and its digest), or absent
--   flight        true: the prompts in flight (least-busy)
--   timings       true: each member's recent timings (lowest-latency)
--   buckets       per member: {its bucket's key prefix, true when it has limits of its own}
--   reports       how many of a bucket's last token reports to read
--   now           the time of the choice ('%.6f'), or absent: the server's (tests give one)
-- Returns {version, position, cooldowns (a flat hash), tie or '', in flight (a flat hash),
-- timings per member, per member its bucket's {version, declared limits (a flat hash),
-- requests and tokens in the last 60 s and 86400 s, its reservations (a flat hash) and its
-- last token reports with their times (these three when it has limits, its own or declared)},
-- the time, the prefix's tie or ''}.
local function snapshot(p, want)
  local format = tonumber(redis.call('GET', 'llm-lb:format') or '0')
  if format and format > want.format then
    error('llm-lb: newer format ' .. format)
  end
  local now = tonumber(want.now)
  if not now then
    local t = redis.call('TIME')
    now = tonumber(t[1]) + tonumber(t[2]) / 1000000
  end
  local out = {}
  out[1] = redis.call('GET', p .. 'version') or '0'
  out[2] = redis.call('HGET', p .. 'rotation', 'position') or '0'
  out[3] = redis.call('HGETALL', p .. 'cooldowns')
  out[4] = ''
  if want.conversation then out[4] = redis.call('HGET', p .. 'ties', want.conversation) or '' end
  out[5] = {}
  if want.flight then out[5] = redis.call('HGETALL', p .. 'flight') end
  local timings = {}
  if want.timings then
    for i = 0, want.members - 1 do
      timings[#timings + 1] = redis.call('LRANGE', p .. 'timings:' .. i, 0, -1)
    end
  end
  out[6] = timings
  local buckets = {}
  for _, b in ipairs(want.buckets) do
    local bp, limited = b[1], b[2]
    local declared = redis.call('HGETALL', bp .. 'limits')
    local totals, reserved, reports = {}, {}, {}
    if limited or #declared > 0 then
      reserved = redis.call('HGETALL', bp .. 'reserved')
      reports = redis.call('ZREVRANGE', bp .. 'spent', 0, want.reports - 1, 'WITHSCORES')
      local top = redis.call('ZREVRANGE', bp .. 'spent', 0, 0)
      local newest = 0
      if #top > 0 then newest = tonumber(string.match(top[1], '^(%d+)')) end
      for _, w in ipairs({60, 86400}) do
        local start = '(' .. string.format('%.6f', now - w)
        totals[#totals + 1] = tostring(redis.call('ZCOUNT', bp .. 'requests', start, '+inf'))
        local used = 0
        local first = redis.call('ZRANGEBYSCORE', bp .. 'spent', start, '+inf', 'LIMIT', 0, 1)
        if #first > 0 then
          local cum, spent = string.match(first[1], '^(%d+):(%d+)')
          used = newest - (tonumber(cum) - tonumber(spent))
        end
        totals[#totals + 1] = string.format('%d', used)
      end
    end
    buckets[#buckets + 1] = {
      redis.call('GET', bp .. 'version') or '0', declared, totals, reserved, reports}
  end
  out[7] = buckets
  out[8] = string.format('%.6f', now)
  out[9] = ''
  if want.prefix then out[9] = redis.call('HGET', p .. 'prefixes', want.prefix) or '' end
  return out
end
