-- finish: a prompt that ended without an outcome (the caller stopped reading) is no longer in
-- flight.
-- ARGV[1]  the balancer's key prefix
-- ARGV[2]  its ticket
-- ARGV[3]  seconds a balancer's keys are kept without use
local p = ARGV[1]
if redis.call('HDEL', p .. 'flight', ARGV[2]) == 1 then
  redis.call('ZREM', p .. 'flight_at', ARGV[2])
  bump(p, tonumber(ARGV[3]))
end
return 1
