-- Draw credits on a campaign budget, each all or nothing, once per ledger entry.
-- KEYS[1] budget hash; ARGV[1] the budget, then pairs of (entry_id, amount), answered in
-- order (first come, first served). Each answer is remembered per entry, so a re-run after
-- a crash gets the same answer and never draws twice.
local budget = tonumber(ARGV[1])
local spent = tonumber(redis.call('HGET', KEYS[1], 'spent') or '0')
local answers = {}
for i = 2, #ARGV, 2 do
  local field = 'd:' .. ARGV[i]
  local drawn = redis.call('HGET', KEYS[1], field)
  if drawn then
    table.insert(answers, tonumber(drawn))
  else
    local fits = 0
    if spent + tonumber(ARGV[i + 1]) <= budget then
      spent = spent + tonumber(ARGV[i + 1])
      fits = 1
    end
    redis.call('HSET', KEYS[1], field, fits)
    table.insert(answers, fits)
  end
end
redis.call('HSET', KEYS[1], 'spent', spent)
return answers
