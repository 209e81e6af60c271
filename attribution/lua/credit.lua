-- Apply ledger entries to balances, each exactly once.
-- KEYS[1] balances hash, KEYS[2] applied-entries hash (same slot); ARGV: triples of
-- (entry_id, balance field, amount). An entry already applied is skipped, so a batch
-- re-run after a crash credits nothing twice.
for i = 1, #ARGV, 3 do
  if redis.call('HSETNX', KEYS[2], ARGV[i], 1) == 1 then
    redis.call('HINCRBY', KEYS[1], ARGV[i + 1], ARGV[i + 2])
  end
end
return 1
