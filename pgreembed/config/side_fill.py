"""`[side_fill]`: when a backlog goes through a side column instead of the indexed live one.

Writing into a column with an HNSW index is ~90x slower than into one without; filling a
side column and building its index afterwards is cheaper once the backlog is a large
enough share of the table (the index is rebuilt over every row). The defaults come from
`python -m bench.side_fill_crossover` (docs/migrations.md, "Big backlogs").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pgreembed.config.fields import Check, read_declared, setting, table_keys
from pgreembed.errors import ConfigError


def _at_least(low: float, kind: type) -> Check:
    def check(value: Any, where: str) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                kind is int and not isinstance(value, int)) or value < low:
            what = "an integer" if kind is int else "a number"
            raise ConfigError(f"{where}: must be {what} >= {low:g}, got {value!r}")
        return kind(value)
    return check


def _true_or_false(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: must be true or false, got {value!r}")
    return value


def _size(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: must be a size such as '1GB', got {value!r}")
    return value


@dataclass(frozen=True)
class SideFillSettings:
    enabled: bool = setting(True, check=_true_or_false, typed=False)
    # A side fill starts when the live column's backlog exceeds both of these.
    min_rows: int = setting(1000, check=_at_least(1, int), typed=False)
    min_share: float = setting(0.4, check=_at_least(0, float), typed=False)
    # After the swap, the previous column is kept this long (rollback), then dropped.
    grace_seconds: float = setting(600.0, check=_at_least(0, float), typed=False)
    # Upper bound for the index build's maintenance_work_mem (it is sized to the index).
    maintenance_work_mem: str = setting("1GB", check=_size, typed=False)
    # max_parallel_maintenance_workers of the build; None: the server's own setting.
    parallel_workers: int | None = setting(None, check=_at_least(0, int), typed=False)

    def threshold(self, table_rows: int) -> int:
        """Pending rows above which the side column is the faster path."""
        return max(self.min_rows, int(self.min_share * table_rows))


SIDE_FILL_KEYS = table_keys(SideFillSettings)


def parse_side_fill(raw: Mapping[str, Any]) -> SideFillSettings:
    """The `[side_fill]` table (its keys already checked against SIDE_FILL_KEYS); every error
    names its field."""
    return SideFillSettings(**read_declared(SideFillSettings, raw, "side_fill"))
