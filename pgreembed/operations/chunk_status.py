"""What `status` says of chunked targets besides the chunk table's columns: the chunk
stage's backlog (parents whose chunk set is to be made again)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import psycopg

from pgreembed.config import Settings
from pgreembed.store.chunk_sets import dirty_count


@dataclass(frozen=True)
class ChunkingStatus:
    target: str
    parent_table: str
    chunk_table: str
    parents_to_chunk: int

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def line(self) -> str:
        return (f"chunks of {self.target}: {self.parents_to_chunk} rows of"
                f" {self.parent_table} to chunk; the columns above count chunks"
                f" ({self.chunk_table})")


def chunking_status(conn: psycopg.Connection, settings: Settings) -> list[ChunkingStatus]:
    found = []
    for target in settings.targets.values():
        if target.parent is not None:
            found.append(ChunkingStatus(
                target.name, f"{target.parent.schema}.{target.parent.table}",
                f"{target.schema}.{target.table}", dirty_count(conn, target)))
    return found
