"""The app comes first: a backfill's writes paced to a rows/s cap shared by every
worker (Redis), and lowered while the app's queries suffer (adaptive mode).

The cap is the shared rate limiter of `ratelimit.py` with rows as its tokens and a
one-second window. A batch is admitted in chunks that fit the window's budget even when
backed off to MIN_FACTOR: a reservation bigger than the budget would pass alone and
exceed the rate, and a window long enough to hold a whole batch would let a burst of
that many rows through at once. Adaptive mode
reuses the limiter's AIMD factor: each worker process probes the database every
`probe_interval` seconds (a probe query's latency, other clients' active queries,
`pgreembed.store.load`); a probe over its bound halves the factor for every worker
(at most once per cooldown), and the factor climbs back to 1 while probes are fine.
Waits happen before the provider is called, so nothing paid for is held while waiting.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg
import redis

from pgreembed.config import Budget, Settings
from pgreembed.config.throttle import ThrottleSettings
from pgreembed.embedding.ratelimit import RateLimiter, limiter_client
from pgreembed.store.load import LoadSample, sample_load
from pgreembed.store.pool import connect

log = logging.getLogger(__name__)

# AIMD of the adaptive mode: halve on a bad probe (once per cooldown), hold, then climb
# back to the full cap in ~1/RECOVER_PER_SECOND seconds; never below MIN_FACTOR of it.
DECREASE, MIN_FACTOR = 0.5, 0.1
HOLD_SECONDS, RECOVER_PER_SECOND, COOLDOWN_SECONDS = 2.0, 0.05, 1.0
WINDOW_SECONDS = 1.0


class Throttle:
    """Paces rows written by every worker sharing `client`'s Redis."""

    def __init__(self, config: ThrottleSettings, client: redis.Redis,
                 probe: Callable[[], LoadSample] | None = None,
                 namespace: str = "pgreembed") -> None:
        cap = config.max_rows_per_second or 0
        self.config = config
        self.chunk = max(1, int(cap * WINDOW_SECONDS * MIN_FACTOR))
        budget = Budget(tokens_per_minute=max(1, round(cap * WINDOW_SECONDS)))
        self.limiter = RateLimiter(client, "throttle:rows", budget=lambda: budget,
                                   window_seconds=WINDOW_SECONDS, decrease=DECREASE,
                                   min_factor=MIN_FACTOR, hold_seconds=HOLD_SECONDS,
                                   recover_per_second=RECOVER_PER_SECOND,
                                   cooldown_seconds=COOLDOWN_SECONDS, namespace=namespace)
        self._probe = probe
        self._probe_lock = threading.Lock()
        self._probed_at = 0.0

    def admit(self, rows: int) -> float:
        """Wait until `rows` more rows may be written; returns the seconds waited."""
        if not self.config:
            return 0.0
        waited = 0.0
        while rows > 0:
            self.check_load()  # also between chunks: a long wait keeps probing
            chunk = min(rows, self.chunk)
            waited += self.limiter.acquire(chunk)
            rows -= chunk
        return waited

    def check_load(self) -> LoadSample | None:
        """Probe (one thread per process, every probe_interval) and back off if busy."""
        if not self.config.adaptive or self._probe is None:
            return None
        if time.monotonic() - self._probed_at < self.config.probe_interval:
            return None
        if not self._probe_lock.acquire(blocking=False):
            return None  # another thread of this process is probing
        try:
            self._probed_at = time.monotonic()
            try:
                sample = self._probe()
            except psycopg.Error as exc:
                log.warning("throttle: the load probe failed (%s); not backing off for it",
                            type(exc).__name__)
                return None
            why = self.overloaded(sample)
            if why:
                self.limiter.report_rate_limited(why)
            return sample
        finally:
            self._probe_lock.release()

    def overloaded(self, sample: LoadSample) -> str | None:
        """Why `sample` says the app is suffering, or None."""
        if sample.probe_seconds * 1000 > self.config.max_probe_ms:
            return (f"the app's probe query took {sample.probe_seconds * 1000:.0f} ms"
                    f" (max_probe_ms {self.config.max_probe_ms:g})")
        if self.config.max_active is not None and sample.active_others > self.config.max_active:
            return (f"{sample.active_others} active queries of other clients"
                    f" (max_active {self.config.max_active})")
        return None

    def factor(self) -> float:
        """The share of the cap in force now (1.0: not backed off)."""
        return self.limiter.factor()


class _Prober:
    """One dedicated autocommit connection per process (not the pool's: the pool is
    busy writing exactly when the probe matters)."""

    def __init__(self, dsn: str, config: ThrottleSettings) -> None:
        self.dsn = dsn
        self.config = config
        self._conn: psycopg.Connection | None = None

    def __call__(self) -> LoadSample:
        if self._conn is None or self._conn.closed:
            self._conn = connect(self.dsn, autocommit=True, vector=False)
        timeout_ms = max(1, int(10 * self.config.max_probe_ms))
        try:
            return sample_load(self._conn, self.config.probe_sql, timeout_ms)
        except psycopg.OperationalError:
            self._conn.close()
            raise


@dataclass(frozen=True)
class ThrottleState:
    """What `status` and `doctor` show of the throttle: its config, and from Redis the
    pace in force now (None where not configured or Redis did not answer)."""

    max_rows_per_second: int | None
    adaptive: bool
    max_probe_ms: float | None
    max_active: int | None
    factor: float | None = None  # share of the cap in force (adaptive back-offs)
    rows_per_second_now: float | None = None
    last_back_off_seconds: float | None = None  # None: none since the pace recovered
    waiting: int | None = None  # chunks of rows booked for a later second

    def as_dict(self) -> dict[str, object]:
        return {"configured": self.max_rows_per_second is not None,
                "max_rows_per_second": self.max_rows_per_second, "adaptive": self.adaptive,
                "max_probe_ms": self.max_probe_ms, "max_active": self.max_active,
                "factor": None if self.factor is None else round(self.factor, 3),
                "rows_per_second_now": None if self.rows_per_second_now is None
                else round(self.rows_per_second_now, 1),
                "last_back_off_seconds": None if self.last_back_off_seconds is None
                else round(self.last_back_off_seconds, 1), "waiting": self.waiting}

    def line(self) -> str:
        """One line for `status` and `doctor`."""
        if self.max_rows_per_second is None:
            return "throttle: none ([throttle] max_rows_per_second is not set)"
        text = f"throttle: at most {self.max_rows_per_second} rows/s"
        if self.adaptive:
            active = "" if self.max_active is None else f" or > {self.max_active} active queries"
            text += f", adaptive (backs off on a probe > {self.max_probe_ms:g} ms{active})"
        if self.factor is None or self.rows_per_second_now is None:
            return text + "; current pace unknown (Redis did not answer)"
        text += f"; now {self.rows_per_second_now:.0f} rows/s ({self.factor:.0%} of the cap)"
        if self.last_back_off_seconds is not None:
            text += f", last back-off {self.last_back_off_seconds:.0f} s ago"
        if self.waiting:
            text += f", {self.waiting} chunks waiting their turn"
        return text


def observe(config: ThrottleSettings, client: redis.Redis) -> ThrottleState:
    """The throttle as every worker sees it (the shared Redis keys); reads only."""
    state = ThrottleState(config.max_rows_per_second, config.adaptive,
                          config.max_probe_ms if config.adaptive else None,
                          config.max_active if config.adaptive else None)
    if not config:
        return state
    try:
        factor, since, waiting = Throttle(config, client).limiter.observe()
    except redis.RedisError:
        return state
    cap = config.max_rows_per_second or 0
    return ThrottleState(state.max_rows_per_second, state.adaptive, state.max_probe_ms,
                         state.max_active, factor, cap * factor, since, waiting)


_throttles: dict[tuple[str, str], Throttle] = {}
_lock = threading.Lock()


def throttle_for(settings: Settings) -> Throttle:
    """The process-wide throttle (create it in the worker process, after fork)."""
    key = (settings.database_url, settings.redis_url)
    with _lock:
        if key not in _throttles:
            _throttles[key] = Throttle(settings.throttle, limiter_client(settings.redis_url),
                                       _Prober(settings.database_url, settings.throttle))
        return _throttles[key]
