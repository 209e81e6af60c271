-- Give back a claim an event made but did not use (it was a duplicate, or still waits).
-- KEYS[1] hash of the id's bucket; ARGV: field, event_id. Only a bare claim (kind 'c') of
-- that very event is removed; a full record, or anyone else's claim, stays.
local current = redis.call('HGET', KEYS[1], ARGV[1])
if not current or string.sub(current, 1, 1) ~= 'c' then return 0 end
local size = string.byte(current, 2) * 256 + string.byte(current, 3)
if string.sub(current, 4, 3 + size) == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  return 1
end
return 0
