"""pgai's catalog as values: what `import-pgai` reads from `ai.vectorizer` (pgai >= 0.10).

Kept apart from the SQL (store/pgai_catalog.py) and the mapping (operations/pgai_import):
plain data the three share. The `config` jsonb is kept as pgai wrote it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# pgai moved the chunk table's names into config.destination and the text column into
# config.loading in 0.10 (its migrations 022 and 028); older catalogs cannot be read here.
MIN_PGAI_VERSION = (0, 10, 0)
UPGRADE_STEP = ("upgrade pgai first: `ALTER EXTENSION ai UPDATE TO '0.10.1'` (if the `ai`"
                " extension is installed), then `pgai install -d <DATABASE_URL>` (pip install"
                " 'pgai>=0.10'); then run import-pgai again")


@dataclass(frozen=True)
class CatalogVersion:
    """Which pgai the database holds. `legacy` says the catalog has the pre-0.10 columns."""

    installed: bool  # an ai.vectorizer table exists
    lib_version: str | None  # ai.pgai_lib_version (pgai >= 0.10 installs it)
    extension_version: str | None  # the old `ai` extension, if installed
    legacy: bool  # ai.vectorizer still has target_table/view_name (before migration 028)

    @property
    def supported(self) -> bool:
        if not self.installed or self.legacy or self.lib_version is None:
            return False
        return parse_version(self.lib_version) >= MIN_PGAI_VERSION


def parse_version(text: str) -> tuple[int, ...]:
    """"0.12.1" -> (0, 12, 1); a pre-release suffix is ignored ("0.10.0-dev" -> (0, 10, 0))."""
    parts = []
    for piece in text.split("-")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


@dataclass(frozen=True)
class KeyColumn:
    """One column of the source's primary key, as `ai.vectorizer.source_pk` lists it."""

    name: str
    type: str  # format_type(), e.g. "bigint", "character varying(20)"
    pknum: int


@dataclass(frozen=True)
class Vectorizer:
    """One `ai.vectorizer` row."""

    id: int
    name: str
    source_schema: str
    source_table: str
    source_pk: tuple[KeyColumn, ...]
    config: dict[str, Any]
    disabled: bool
    queue_schema: str
    queue_table: str
    queue_failed_table: str | None
    trigger_name: str

    def section(self, key: str) -> dict[str, Any]:
        found = self.config.get(key) or {}
        return dict(found)

    @property
    def destination_kind(self) -> str:
        """"table" (a chunk table and a view) or "column" (a vector column on the source)."""
        return str(self.section("destination").get("implementation", "table"))

    @property
    def chunk_table(self) -> tuple[str, str] | None:
        dest = self.section("destination")
        if self.destination_kind != "table":
            return None
        return str(dest["target_schema"]), str(dest["target_table"])


@dataclass(frozen=True)
class Counts:
    """What a vectorizer holds and owes, counted when the plan was made."""

    rows: int  # source rows
    chunks: int  # chunk rows (table destination) or rows with a vector (column destination)
    queued: int  # distinct keys in pgai's queue (stale or never embedded)
    failed: int  # rows in pgai's failed queue


@dataclass(frozen=True)
class StoredParent:
    """A sampled source row with the chunks pgai stored for it (chunk_seq order)."""

    key: Any
    text: str | None
    row: dict[str, Any]  # the source row's columns (template values)
    chunks: list[str]


@dataclass(frozen=True)
class StoredChunk:
    key: Any  # embedding_uuid, or the source key for a column destination
    text: str
    vector: list[float]
