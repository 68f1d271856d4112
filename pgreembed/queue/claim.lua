-- Claim rows for a slot (pgreembed.queue.claims): add the members that are not in
-- flight yet, scored ARGV[1]; return those (atomically, one round trip).
local added = {}
for i, member in ipairs(ARGV) do
    if i > 1 and redis.call('ZADD', KEYS[1], 'NX', ARGV[1], member) == 1 then
        added[#added + 1] = member
    end
end
return added
