-- Shared requests/tokens-per-minute budgets of one model (pgreembed.embedding.ratelimit);
-- the keys and arguments are described where the script is loaded.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local mode = ARGV[1]
local window = tonumber(ARGV[5])
local decrease, min_factor = tonumber(ARGV[7]), tonumber(ARGV[8])
local hold, recover, cooldown = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])

local adapt = redis.call('HMGET', KEYS[3], 'factor', 'cut_at')
local cut_factor = tonumber(adapt[1]) or 1
local cut_at = tonumber(adapt[2]) or -1e18
local factor = math.min(1, cut_factor + math.max(0, now - cut_at - hold) * recover)

if mode == 'factor' then
    return tostring(factor)
end
if mode == 'report' then
    if now - cut_at < cooldown then
        return tostring(-factor)  -- this burst of 429s already lowered the budgets
    end
    factor = math.max(min_factor, factor * decrease)
    redis.call('HSET', KEYS[3], 'factor', factor, 'cut_at', now)
    local ttl = hold + (1 - factor) / math.max(recover, 1e-9) + window
    redis.call('PEXPIRE', KEYS[3], math.ceil(ttl * 1000))
    return tostring(factor)
end

local tokens = tonumber(ARGV[2])
local rpm, tpm = tonumber(ARGV[3]), tonumber(ARGV[4])
local max_requests = rpm > 0 and math.max(1, math.floor(rpm * factor)) or nil
local max_tokens = tpm > 0 and math.max(1, math.floor(tpm * factor)) or nil
-- A request bigger than the whole budget passes alone in an otherwise empty window.
if max_tokens and tokens > max_tokens then tokens = max_tokens end

local state = redis.call('HMGET', KEYS[2], 'sum', 'last')
local sum = tonumber(state[1]) or 0
local at = math.max(now, tonumber(state[2]) or 0)
local function tokens_of(member) return tonumber(string.match(member, '^(%d+):')) end

-- Reservations are in time order and only ever added at `at` or later, so the
-- ones that no longer count at `at` never count again.
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', at - window)) do
    sum = sum - tokens_of(member)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', at - window)
local count = redis.call('ZCARD', KEYS[1])
if count == 0 then sum = 0 end
while count > 0 and ((max_requests and count + 1 > max_requests)
                     or (max_tokens and sum + tokens > max_tokens)) do
    local oldest = redis.call('ZPOPMIN', KEYS[1])
    sum = sum - tokens_of(oldest[1])
    count = count - 1
    at = math.max(at, tonumber(oldest[2]) + window)
end
if count == 0 then sum = 0 end

redis.call('ZADD', KEYS[1], at, tokens .. ':' .. ARGV[6])
redis.call('HSET', KEYS[2], 'sum', sum + tokens, 'last', at)
local ttl = math.ceil((at - now + window + 1) * 1000)
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
return tostring(at - now)
