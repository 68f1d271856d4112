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
from pathlib import Path

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
_SCRIPT = (Path(__file__).parent / "ratelimit.lua").read_text()


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

    def report_rate_limited(self, why: str = "provider returned 429") -> float:
        """The provider answered 429 anyway (or `why`): lower the shared budgets for a
        while. Returns the factor the budgets are now multiplied by."""
        factor = self._call("report")  # negative: already lowered for this burst
        if factor is None:
            return 1.0
        if factor > 0:
            log.warning("rate limit %s: %s; budgets lowered to %.0f%%",
                        self.name, why, factor * 100)
        return abs(factor)

    def factor(self) -> float:
        """What the budgets are currently multiplied by (1.0 when no 429 was reported lately)."""
        factor = self._call("factor")
        return 1.0 if factor is None else factor

    def observe(self) -> tuple[float, float | None, int]:
        """For `status` and `doctor`: (the factor now, seconds since the budgets were last
        lowered or None once recovered (the record expires then), reservations booked for
        later: requests waiting their turn). Raises redis.RedisError."""
        factor = float(self._script(keys=self._keys, args=[
            "factor", 0, 0, 0, self._settings[0], "", *self._settings[1:]]))
        client = self._script.registered_client
        seconds, micros = client.time()
        now = seconds + micros / 1e6
        cut_at = client.hget(self._keys[2], "cut_at")
        waiting = int(client.zcount(self._keys[0], f"({now}", "+inf"))
        return factor, None if cut_at is None else max(0.0, now - float(cut_at)), waiting


def limiter_for_model(settings: Settings, provider: str, model: str) -> RateLimiter:
    """The limiter of one model, shared by every worker through one Redis key per model.

    Its budgets are those `pgreembed.embedding.budgets` finds for the model (config, and what
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
