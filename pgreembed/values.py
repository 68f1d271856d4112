"""The plain value types every floor passes around: a row as read for embedding, and
what became of it (a vector, or a reason).

They live on the ground floor so that `store/` (which writes them) and `embedding/`
(which makes them) both depend on this module and not on each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from uuid import UUID

if TYPE_CHECKING:  # an annotation only: the CLI and the scheduler need no numpy
    import numpy as np


@dataclass(frozen=True)
class Row:
    """A row as read for embedding: key, text, and the hash the write is guarded by.

    `version`: the row version's xmin when it was read (None if unknown): the write skips
    hashing the text of a row still at that version (store.rows.write_vectors)."""

    pk: Any
    text: str | None
    content_hash: Any
    version: int | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Embedded:
    row: Row
    vector: np.ndarray
    truncated: bool = False


@dataclass(frozen=True)
class Failed:
    row: Row
    reason: str


# A chunked target's chunk rows (pgreembed.chunking.matching decides, store.chunk_sets applies).
@dataclass(frozen=True)
class Existing:
    """One chunk row as stored."""

    uuid: UUID
    seq: int
    text: str
    has_vector: bool


@dataclass
class Diff:
    """What to do to one parent's chunk rows."""

    delete: list[UUID] = field(default_factory=list)
    # (uuid, new seq) of kept rows whose position changed
    move: list[tuple[UUID, int]] = field(default_factory=list)
    # (seq, text) of new rows (vector NULL: the embedding machinery fills them)
    insert: list[tuple[int, str]] = field(default_factory=list)
    kept: int = 0

    @property
    def empty(self) -> bool:
        return not (self.delete or self.move or self.insert)
