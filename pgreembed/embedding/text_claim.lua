-- Pay once per text across batches (pgreembed.embedding.text_claims): for each key
-- (slot, model, text hash), return its vector if a batch published one, else the other
-- batch's claim if one holds it, else claim it for ARGV[1] (ARGV[2] ms) and return 'M'.
local out = {}
for i, key in ipairs(KEYS) do
    local value = redis.call('GET', key)
    if value then
        out[i] = value
    else
        redis.call('SET', key, ARGV[1], 'PX', ARGV[2])
        out[i] = 'M'
    end
end
return out
