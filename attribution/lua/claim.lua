-- Claim an id (share or order) for one event, atomically and idempotently.
-- KEYS[1] hash of the id's bucket; ARGV: field, event_id, claim record.
-- Records start with a kind byte, a 2-byte length and the owning event id, so a re-run of
-- the same event finds its own claim (or its own full record) and succeeds again.
local current = redis.call('HGET', KEYS[1], ARGV[1])
if not current then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  return 1
end
local size = string.byte(current, 2) * 256 + string.byte(current, 3)
if string.sub(current, 4, 3 + size) == ARGV[2] then
  return 1
end
return 0
