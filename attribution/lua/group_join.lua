-- Join a buyer to a group; answer 1 when this event's join completed it.
-- KEYS[1] group hash; ARGV: field, buyer, event_id, size. The completing event id is
-- kept, so the completion (and its reward) belongs to one event, also under re-runs.
local current = redis.call('HGET', KEYS[1], ARGV[1])
local group = {b = {}}
if current then group = cjson.decode(current) end
if group.done then
  if group.done == ARGV[3] then return 1 end
  return 0
end
local member = false
for _, buyer in ipairs(group.b) do
  if buyer == ARGV[2] then member = true end
end
if not member then table.insert(group.b, ARGV[2]) end
if #group.b >= tonumber(ARGV[4]) then
  group = {done = ARGV[3], b = {}}
end
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(group))
if group.done == ARGV[3] then return 1 end
return 0
