-- snapshot(p, want): what a choice needs of the balancer whose keys start with p, read at once.
-- want (a table, from JSON):
--   members       the number of members
--   conversation  the conversation whose tie to read, or absent
--   flight        true: the prompts in flight (least-busy)
--   timings       true: each member's recent timings (lowest-latency)
--   limited       for each member with limits: {index, {window seconds, ...}, counts tokens}
--   now           the time of the choice ('%.6f'), or absent: the server's (tests give one)
-- Returns {version, position, cooldowns (a flat hash), tie or '', in flight (a flat hash),
-- timings per member, per limited member and window its requests and tokens, the time}.
local function snapshot(p, want)
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
  local totals = {}
  for _, limited in ipairs(want.limited) do
    local m, windows, tokens = string.format('%d', limited[1]), limited[2], limited[3]
    local newest = 0
    if tokens then
      local top = redis.call('ZREVRANGE', p .. 'spent:' .. m, 0, 0)
      if #top > 0 then newest = tonumber(string.match(top[1], '^(%d+)')) end
    end
    for _, w in ipairs(windows) do
      local start = '(' .. string.format('%.6f', now - w)
      totals[#totals + 1] = tostring(redis.call('ZCOUNT', p .. 'requests:' .. m, start, '+inf'))
      local used = 0
      if tokens then
        local first = redis.call('ZRANGEBYSCORE', p .. 'spent:' .. m, start, '+inf', 'LIMIT', 0, 1)
        if #first > 0 then
          local cum, spent = string.match(first[1], '^(%d+):(%d+)')
          used = newest - (tonumber(cum) - tonumber(spent))
        end
      end
      totals[#totals + 1] = string.format('%d', used)
    end
  end
  out[7] = totals
  out[8] = string.format('%.6f', now)
  return out
end
