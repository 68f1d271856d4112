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

from pgreembed.errors import ConfigError

SIDE_FILL_KEYS = ("enabled", "min_rows", "min_share", "grace_seconds", "maintenance_work_mem",
        "parallel_workers")


@dataclass(frozen=True)
class SideFillSettings:
    enabled: bool = True
    # A side fill starts when the live column's backlog exceeds both of these.
    min_rows: int = 1000
    min_share: float = 0.4
    # After the swap, the previous column is kept this long (rollback), then dropped.
    grace_seconds: float = 600.0
    # Upper bound for the index build's maintenance_work_mem (it is sized to the index).
    maintenance_work_mem: str = "1GB"
    # max_parallel_maintenance_workers of the build; None: the server's own setting.
    parallel_workers: int | None = None

    def threshold(self, table_rows: int) -> int:
        """Pending rows above which the side column is the faster path."""
        return max(self.min_rows, int(self.min_share * table_rows))


def parse_side_fill(raw: Mapping[str, Any]) -> SideFillSettings:
    """The `[side_fill]` table (its keys already checked against SIDE_FILL_KEYS); every error names
    its field."""
    defaults = SideFillSettings()

    def number(key: str, kind: type, low: float) -> Any:
        value = raw.get(key, getattr(defaults, key))
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                kind is int and not isinstance(value, int)) or value < low:
            what = "an integer" if kind is int else "a number"
            raise ConfigError(f"side_fill.{key}: must be {what} >= {low:g}, got {value!r}")
        return kind(value)

    enabled = raw.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"side_fill.enabled: must be true or false, got {enabled!r}")
    memory = raw.get("maintenance_work_mem", defaults.maintenance_work_mem)
    if not isinstance(memory, str) or not memory.strip():
        raise ConfigError(f"side_fill.maintenance_work_mem: must be a size such as '1GB',"
                          f" got {memory!r}")
    workers = raw.get("parallel_workers")
    return SideFillSettings(
        enabled=enabled, min_rows=number("min_rows", int, 1),
        min_share=number("min_share", float, 0), grace_seconds=number("grace_seconds", float, 0),
        maintenance_work_mem=memory,
        parallel_workers=None if workers is None else number("parallel_workers", int, 0))
