-- read: what a choice needs (snapshot.lua).
-- ARGV[1]  the balancer's key prefix
-- ARGV[2]  what to read: JSON, the `want` of snapshot()
return snapshot(ARGV[1], cjson.decode(ARGV[2]))
