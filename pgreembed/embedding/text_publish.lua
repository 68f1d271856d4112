-- Publish vectors for the batches waiting on their texts (pgreembed.embedding.text_claims):
-- key i gets ARGV[2 + i] for ARGV[2] seconds if ARGV[1]'s claim still holds it.
for i, key in ipairs(KEYS) do
    if redis.call('GET', key) == ARGV[1] then
        redis.call('SET', key, ARGV[2 + i], 'EX', ARGV[2])
    end
end
return #KEYS
