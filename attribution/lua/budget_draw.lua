-- Draw one credit on a campaign budget, all or nothing, once per ledger entry.
-- KEYS[1] budget hash; ARGV: entry_id, amount, budget. The answer is remembered per
-- entry so a re-run after a crash gets the same answer and never draws twice.
local drawn = redis.call('HGET', KEYS[1], 'd:' .. ARGV[1])
if drawn then return tonumber(drawn) end
local spent = tonumber(redis.call('HGET', KEYS[1], 'spent') or '0')
local fits = 0
if spent + tonumber(ARGV[2]) <= tonumber(ARGV[3]) then
  redis.call('HINCRBY', KEYS[1], 'spent', ARGV[2])
  fits = 1
end
redis.call('HSET', KEYS[1], 'd:' .. ARGV[1], fits)
return fits
