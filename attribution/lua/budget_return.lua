-- Give a committed batch's clawbacks back to the campaign budget, exactly once.
-- KEYS[1] budget hash; ARGV[1] partition, ARGV[2] commit sequence number, ARGV[3] amount.
local mark = '~p' .. ARGV[1]
local done = tonumber(redis.call('HGET', KEYS[1], mark) or '0')
if tonumber(ARGV[2]) <= done then return 0 end
redis.call('HINCRBY', KEYS[1], 'spent', -tonumber(ARGV[3]))
redis.call('HSET', KEYS[1], mark, ARGV[2])
return 1
