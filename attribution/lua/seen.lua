-- An event id's duplicate mark, from this generation or the previous one (same slot).
-- KEYS[1] current, KEYS[2] previous generation; ARGV[1] the id's digest.
return redis.call('HGET', KEYS[1], ARGV[1]) or redis.call('HGET', KEYS[2], ARGV[1])
