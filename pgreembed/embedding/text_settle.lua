-- Settle the claims ARGV[1] still holds (pgreembed.embedding.text_claims); ARGV[2] is
-- 'waited' (before the write: only texts a batch waits on) or 'final' (after it).
-- ARGV[3], ARGV[4]: seconds a vector, a 'D' (done) marker is kept; ARGV[4 + i]: key i's
-- vector, '' when it got none. A waited text gets its vector; in 'final', a text bought
-- that nobody waits on becomes 'D' (its vector is in Postgres: a later batch copies it
-- from there), one without a vector is dropped (a later batch buys it).
-- Returns 1 for each key settled, 0 for each left (or no longer ours).
local out = {}
for i, key in ipairs(KEYS) do
    local value = ARGV[4 + i]
    out[i] = 0
    if redis.call('GET', key) == ARGV[1] then
        local waited = redis.call('EXISTS', key .. ':w') == 1
        if value ~= '' and waited then
            redis.call('SET', key, value, 'EX', ARGV[3])
            out[i] = 1
        elseif ARGV[2] == 'final' then
            if value == '' then
                redis.call('DEL', key)
            else
                redis.call('SET', key, 'D', 'EX', ARGV[4])
            end
            out[i] = 1
        end
    end
end
return out
