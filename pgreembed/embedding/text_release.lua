-- Drop the claims ARGV[1] still holds (a vector published meanwhile, or another batch's
-- claim taken after ours expired, stays); returns how many were dropped.
local dropped = 0
for _, key in ipairs(KEYS) do
    if redis.call('GET', key) == ARGV[1] then
        redis.call('DEL', key)
        dropped = dropped + 1
    end
end
return dropped
