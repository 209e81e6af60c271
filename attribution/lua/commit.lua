-- Commit one batch of one partition, atomically and fenced: its hashes, its position, and
-- its credits into the partition's outbox under the next commit sequence number.
-- KEYS[1] epoch, KEYS[2] position, KEYS[3] sequence counter, KEYS[4] outbox, KEYS[5..]
-- hashes of the partition's slot. ARGV[1] the writer's epoch ('' = unfenced), ARGV[2]
-- position ('' = keep), ARGV[3] the outbox payload ('' = nothing to credit), then per hash
-- a count n and n (field, value) pairs; an empty value deletes the field.
-- A writer whose epoch is not the current one lost the partition: it must not write.
-- Returns the sequence number of the outbox entry (0 when there is none).
if ARGV[1] ~= '' then
  local current = redis.call('GET', KEYS[1])
  if current and current ~= ARGV[1] then
    return redis.error_reply('FENCED partition owned by epoch ' .. current)
  end
end
local a = 4
for k = 5, #KEYS do
  local n = tonumber(ARGV[a])
  a = a + 1
  for _ = 1, n do
    if ARGV[a + 1] == '' then
      redis.call('HDEL', KEYS[k], ARGV[a])
    else
      redis.call('HSET', KEYS[k], ARGV[a], ARGV[a + 1])
    end
    a = a + 2
  end
end
if ARGV[2] ~= '' then redis.call('SET', KEYS[2], ARGV[2]) end
if ARGV[3] == '' then return 0 end
local seq = redis.call('INCR', KEYS[3])
redis.call('HSET', KEYS[4], seq, ARGV[3])
return seq
