-- Pay once per text across batches (pgreembed.embedding.text_claims). For each key
-- (slot, model, text hash): absent -> claim it for ARGV[1] (ARGV[2] ms), return 'M';
-- another batch's claim ('C...') -> flag that a batch waits on it (key..':w'), return
-- the claim; a vector ('V...') or done ('D') -> return it.
local out = {}
for i, key in ipairs(KEYS) do
    local value = redis.call('GET', key)
    if not value then
        redis.call('SET', key, ARGV[1], 'PX', ARGV[2])
        out[i] = 'M'
    else
        if string.sub(value, 1, 1) == 'C' then
            redis.call('SET', key .. ':w', '1', 'PX', ARGV[2])
        end
        out[i] = value
    end
end
return out
