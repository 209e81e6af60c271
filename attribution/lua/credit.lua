-- Apply ledger entries to balances, each exactly once.
-- KEYS[1] balances hash; KEYS[2], KEYS[3] this and the previous generation of the
-- applied-entries hash (same slot); ARGV[1] TTL of a generation in ms, then triples of
-- (entry_id, balance field, amount). An entry already applied is skipped, so a batch
-- re-run after a crash credits nothing twice. Marks only need to outlive a crash-restart
-- (after the partition commit no batch is re-run), so generations expire.
for i = 2, #ARGV, 3 do
  if redis.call('HEXISTS', KEYS[3], ARGV[i]) == 0 and redis.call('HSETNX', KEYS[2], ARGV[i], 1) == 1 then
    redis.call('HINCRBY', KEYS[1], ARGV[i + 1], ARGV[i + 2])
  end
end
redis.call('PEXPIRE', KEYS[2], ARGV[1])
return 1
