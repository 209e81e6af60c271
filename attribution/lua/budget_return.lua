-- Give a clawback's amount back to the budget, once per clawback entry.
-- KEYS[1] budget hash; ARGV: pairs of (entry_id, amount).
for i = 1, #ARGV, 2 do
  if redis.call('HSETNX', KEYS[1], 'r:' .. ARGV[i], 1) == 1 then
    redis.call('HINCRBY', KEYS[1], 'spent', -tonumber(ARGV[i + 1]))
  end
end
return 1
