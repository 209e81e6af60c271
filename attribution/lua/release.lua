-- Give back a claim an event made but did not use (it was a duplicate, or still waits).
-- KEYS[1] hash of the id's bucket; ARGV: field, event_id. Only a bare claim of that very
-- event is removed; a full record, or anyone else's claim, stays.
local current = redis.call('HGET', KEYS[1], ARGV[1])
if not current then return 0 end
local ok, record = pcall(cjson.decode, current)
if ok and record[1] == 'c' and record[2] == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  return 1
end
return 0
