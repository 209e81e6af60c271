-- Apply one committed batch's credits to one bucket of balances, exactly once.
-- KEYS[1] balances hash; ARGV[1] partition, ARGV[2] the batch's commit sequence number,
-- then (balance field, amount) pairs. A partition's batches are applied in sequence order,
-- so one high-water mark per partition (field '~p<partition>') makes a repeat a no-op:
-- no mark per ledger entry, nothing to clean up.
local mark = '~p' .. ARGV[1]
local done = tonumber(redis.call('HGET', KEYS[1], mark) or '0')
if tonumber(ARGV[2]) <= done then return 0 end
for i = 3, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('HSET', KEYS[1], mark, ARGV[2])
return 1
