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

from pgreembed.config.fields import (
    positive_number,
    read_declared,
    reject_unknown,
    setting,
    table_keys,
)
from pgreembed.errors import ConfigError


@dataclass(frozen=True)
class ThrottleSettings:
    """None/False everywhere: no throttle (the default, as before)."""

    max_rows_per_second: int | None = setting(None, check=positive_number)
    adaptive: bool = setting(False)
    # Trusted config (like text_sql): what the app's typical query costs when all is well.
    probe_sql: str = setting("SELECT 1")
    max_probe_ms: float = setting(50.0, check=positive_number)
    # Active queries of other clients than pgreembed (pg_stat_activity) that mean "busy".
    max_active: int | None = setting(None, check=positive_number)
    probe_interval: float = setting(0.5, check=positive_number)

    def __bool__(self) -> bool:
        return self.max_rows_per_second is not None


THROTTLE_KEYS = table_keys(ThrottleSettings)


def parse_throttle(raw: Any) -> ThrottleSettings:
    """Validate the `[throttle]` table; every error names the field."""
    if not isinstance(raw, Mapping):
        raise ConfigError("throttle: must be a table ([throttle])")
    reject_unknown(raw, THROTTLE_KEYS, "throttle")
    values = read_declared(ThrottleSettings, raw, "throttle")
    if values["adaptive"] and values["max_rows_per_second"] is None:
        raise ConfigError("throttle.adaptive: needs max_rows_per_second (the rate it backs"
                          " off from and recovers to)")
    return ThrottleSettings(**values)
