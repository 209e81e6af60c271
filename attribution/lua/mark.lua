-- Record duplicate marks in this generation's hash and keep it for the retention.
-- KEYS[1] the generation's hash; ARGV[1] retention in ms, then (digest, mark) pairs.
for i = 2, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
