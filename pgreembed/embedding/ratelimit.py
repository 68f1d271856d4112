"""A rate limit shared by every worker thread, process and machine, kept in Redis.

Providers count requests and tokens per minute over a sliding window, so N
workers that each retry on 429 would keep the provider saturated and turn
most requests into 429s. Instead, before each HTTP attempt a worker reserves
its request in a shared log of reservations (one atomic Lua script, Redis's
clock): the reservation is placed at the earliest moment when the last
`window` seconds, including it, stay within both budgets, and the worker
sleeps until then. Reservations are first come, first served, so no worker
starves.

When a 429 arrives anyway (another client shares the account, or the budget
is set too high), the limiter multiplies a shared factor by `decrease` (at
most once per `cooldown_seconds`, so one burst of 429s counts once), holds it
for `hold_seconds`, then raises it by `recover_per_second` back to 1 (AIMD).
Budgets are multiplied by that factor.

If Redis is unreachable the limiter lets requests through (and logs it): the
provider's own 429 handling still applies, and the queue needs Redis anyway.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from pgreembed.config import Budget, Settings

log = logging.getLogger(__name__)

# KEYS: reservations (ZSET score=time, member="<tokens>:<id>"), window (HASH sum, last),
#       adaptive state (HASH factor, cut_at).
# Returns the seconds to wait ('acquire') or the factor ('report': negative when unchanged).
# ARGV: mode ('acquire' | 'report' | 'factor'), tokens, rpm (0: none), tpm (0: none), window,
#       id, decrease, min_factor, hold, recover per second, cooldown.
_SCRIPT = """
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
"""


class RateLimiter:
    """Requests/min and tokens/min budgets of one model, shared through Redis."""

    def __init__(self, client: redis.Redis, name: str, *,
                 requests_per_minute: int | None = None, tokens_per_minute: int | None = None,
                 budget: Callable[[], Budget] | None = None, window_seconds: float = 60.0,
                 decrease: float = 0.5, min_factor: float = 0.1,
                 hold_seconds: float = 60.0, recover_per_second: float = 0.01,
                 cooldown_seconds: float = 5.0, namespace: str = "pgreembed",
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.client = client
        self.name = name
        # Braces: all three keys live in the same Redis Cluster slot (one script touches them).
        base = f"{namespace}:ratelimit:{{{name}}}"
        self._keys = [f"{base}:log", f"{base}:window", f"{base}:adapt"]
        # Fixed budgets, or a source asked before each request (budgets can change while
        # workers run: a migration records its new model's budget in the bookkeeping).
        fixed = Budget(requests_per_minute, tokens_per_minute)
        self._budget = budget or (lambda: fixed)
        # The budgets are per `window_seconds` (tests use a short window; providers use 60 s).
        self._settings = [window_seconds, decrease, min_factor, hold_seconds,
                          recover_per_second, cooldown_seconds]
        self._script = client.register_script(_SCRIPT)
        self._sleep = sleep
        self._warned_at = 0.0
        self._warn_lock = threading.Lock()

    def budget(self) -> Budget:
        """The budgets in force now (before any lowering after a 429)."""
        return self._budget()

    @property
    def limited(self) -> bool:
        """Whether requests are limited now (else they need no exact token count)."""
        return bool(self._budget())

    def _call(self, mode: str, tokens: int = 0, budget: Budget | None = None) -> float | None:
        window, *adaptive = self._settings
        budget = budget or Budget()
        args: list[str | int | float] = [
            mode, int(tokens), budget.requests_per_minute or 0, budget.tokens_per_minute or 0,
            window, uuid.uuid4().hex, *adaptive]
        try:
            return float(self._script(keys=self._keys, args=args))
        except redis.RedisError as exc:
            self._warn_unavailable(exc)
            return None

    def _warn_unavailable(self, exc: redis.RedisError) -> None:
        with self._warn_lock:
            if time.monotonic() - self._warned_at < 30:
                return
            self._warned_at = time.monotonic()
        log.warning("rate limit %s: Redis unavailable (%s); not limiting meanwhile",
                    self.name, type(exc).__name__)

    def reserve(self, tokens: int) -> float:
        """Book a request of `tokens` tokens; returns the seconds to wait before sending it."""
        budget = self._budget()
        if not budget:
            return 0.0  # no budget names this model (now)
        wait = self._call("acquire", tokens, budget)
        return 0.0 if wait is None else max(0.0, wait)

    def acquire(self, tokens: int) -> float:
        """Book a request and sleep until it fits the budgets; returns the seconds slept."""
        wait = self.reserve(tokens)
        if wait > 0:
            if wait >= 1.0:
                log.info("rate limit %s: waiting %.1fs for budget", self.name, wait)
            self._sleep(wait)
        return wait

    def report_rate_limited(self) -> float:
        """The provider answered 429 anyway: lower the shared budgets for a while.
        Returns the factor the budgets are now multiplied by."""
        factor = self._call("report")  # negative: already lowered for this burst
        if factor is None:
            return 1.0
        if factor > 0:
            log.warning("rate limit %s: provider returned 429; budgets lowered to %.0f%%",
                        self.name, factor * 100)
        return abs(factor)

    def factor(self) -> float:
        """What the budgets are currently multiplied by (1.0 when no 429 was reported lately)."""
        factor = self._call("factor")
        return 1.0 if factor is None else factor


def limiter_for_model(settings: Settings, provider: str, model: str) -> RateLimiter:
    """The limiter of one model, shared by every worker through one Redis key per model.

    Its budgets are those `pgreembed.budgets` finds for the model (config, and what
    `migrate start` recorded), re-read while the worker runs.
    """
    from pgreembed.embedding.budgets import ModelBudget

    return RateLimiter(limiter_client(settings.redis_url), f"{provider}:{model}",
                       budget=ModelBudget(settings, provider, model).current)


def limiter_client(url: str) -> redis.Redis:
    """A client that gives up fast: while Redis is down, requests go unlimited, not late
    (redis-py's default retries with back-off would add seconds to every request)."""
    return redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=5,
                                retry=Retry(NoBackoff(), 1))
