-- Admit a user on a device unless the device already bound `limit` other users.
-- KEYS[1] device hash; ARGV: field, user_id, limit. Idempotent per user.
local current = redis.call('HGET', KEYS[1], ARGV[1])
local users = {}
if current then users = cjson.decode(current) end
for _, user in ipairs(users) do
  if user == ARGV[2] then return 1 end
end
if #users >= tonumber(ARGV[3]) then return 0 end
table.insert(users, ARGV[2])
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(users))
return 1
