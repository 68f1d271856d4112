"""What `status` and the metrics say of chunked targets besides the chunk table's columns
(which count chunks): parents, the chunk stage's backlog and its age, gone marks still to
sweep, chunks and chunks waiting for a vector (pgreembed.store.chunk_counts)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import psycopg

from pgreembed.config import Settings
from pgreembed.store.chunk_counts import chunk_counts


@dataclass(frozen=True)
class ChunkingStatus:
    target: str
    parent_table: str
    chunk_table: str
    parents_to_chunk: int
    parents: int = 0
    parents_estimated: bool = False
    oldest_mark_seconds: float | None = None
    gone_marks: int = 0
    chunks: int = 0
    chunks_estimated: bool = False
    chunks_pending: int = 0

    def as_dict(self) -> dict[str, object]:
        found = asdict(self)
        if self.oldest_mark_seconds is not None:
            found["oldest_mark_seconds"] = round(self.oldest_mark_seconds, 1)
        return found

    def line(self) -> str:
        about = "~" if self.parents_estimated else ""
        chunks = "~" if self.chunks_estimated else ""
        age = ("" if self.oldest_mark_seconds is None
               else f" (oldest marked {self.oldest_mark_seconds:.0f} s ago)")
        gone = (f", {self.gone_marks} deletes to sweep" if self.gone_marks else "")
        return (f"chunks of {self.target}: {about}{self.parents} parents in"
                f" {self.parent_table}, {self.parents_to_chunk} to chunk{age}{gone};"
                f" {chunks}{self.chunks} chunks in {self.chunk_table},"
                f" {self.chunks_pending} without a vector (the columns above count chunks)")


def chunking_status(conn: psycopg.Connection, settings: Settings) -> list[ChunkingStatus]:
    found = []
    for target in settings.targets.values():
        if target.parent is not None:
            counts = chunk_counts(conn, target)
            found.append(ChunkingStatus(
                target.name, f"{target.parent.schema}.{target.parent.table}",
                f"{target.schema}.{target.table}", counts.parents_to_chunk, counts.parents,
                counts.parents_estimated, counts.oldest_mark_seconds, counts.gone_marks,
                counts.chunks, counts.chunks_estimated, counts.chunks_pending))
    return found
