-- Settle the claims ARGV[1] still holds once its batch is done
-- (pgreembed.embedding.text_claims). ARGV[1 + i] says what became of key i's text:
-- 'W' bought and written, 'U' bought but not written, 'N' no vector. A text another
-- batch waits on and that has a vector is left claimed and returned 1 (the caller
-- publishes its vector); else a written text becomes 'D' (done: a later batch copies it
-- from Postgres) for ARGV[#KEYS + 2] seconds, any other claim is dropped (returned 0).
local out = {}
local done_seconds = ARGV[#KEYS + 2]
for i, key in ipairs(KEYS) do
    local what = ARGV[1 + i]
    out[i] = 0
    if redis.call('GET', key) == ARGV[1] then
        if what ~= 'N' and redis.call('EXISTS', key .. ':w') == 1 then
            out[i] = 1
        elseif what == 'W' then
            redis.call('SET', key, 'D', 'EX', done_seconds)
        else
            redis.call('DEL', key)
        end
    end
end
return out
