"""`[throttle]`: how hard a backfill may press on the database the app is using.

A backfill is a guest on the app's database: without a bound, N worker threads
writing into an HNSW-indexed column take every core Postgres has, and the app's
queries wait. The throttle caps rows written per second (all workers together)
and, in adaptive mode, backs off while the app's queries are slow or many.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pgreembed.config_fields import positive, reject_unknown, typed
from pgreembed.errors import ConfigError

THROTTLE_KEYS = ("max_rows_per_second", "adaptive", "probe_sql", "max_probe_ms",
                 "max_active", "probe_interval")


@dataclass(frozen=True)
class ThrottleSettings:
    """None/False everywhere: no throttle (the default, as before)."""

    max_rows_per_second: int | None = None
    adaptive: bool = False
    # Trusted config (like text_sql): what the app's typical query costs when all is well.
    probe_sql: str = "SELECT 1"
    max_probe_ms: float = 50.0
    # Active queries of other clients than pgreembed (pg_stat_activity) that mean "busy".
    max_active: int | None = None
    probe_interval: float = 0.5

    def __bool__(self) -> bool:
        return self.max_rows_per_second is not None


def parse_throttle(raw: Any) -> ThrottleSettings:
    """Validate the `[throttle]` table; every error names the field."""
    if not isinstance(raw, Mapping):
        raise ConfigError("throttle: must be a table ([throttle])")
    reject_unknown(raw, THROTTLE_KEYS, "throttle")

    def number(key: str, kind: type, default: Any) -> Any:
        if raw.get(key) is None:
            return default
        return positive(typed(raw[key], kind, f"throttle.{key}"), f"throttle.{key}")

    adaptive = typed(raw.get("adaptive", False), bool, "throttle.adaptive")
    cap = number("max_rows_per_second", int, None)
    if adaptive and cap is None:
        raise ConfigError("throttle.adaptive: needs max_rows_per_second (the rate it backs"
                          " off from and recovers to)")
    return ThrottleSettings(
        max_rows_per_second=cap,
        adaptive=adaptive,
        probe_sql=typed(raw.get("probe_sql", "SELECT 1"), str, "throttle.probe_sql"),
        max_probe_ms=float(number("max_probe_ms", float, 50.0)),
        max_active=number("max_active", int, None),
        probe_interval=float(number("probe_interval", float, 0.5)),
    )
