"""The plain value types every floor passes around: a row as read for embedding, and
what became of it (a vector, or a reason).

They live on the ground floor so that `store/` (which writes them) and `embedding/`
(which makes them) both depend on this module and not on each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Row:
    """A row as read for embedding: key, text, and the hash the write is guarded by."""

    pk: Any
    text: str | None
    content_hash: Any


@dataclass(frozen=True)
class Embedded:
    row: Row
    vector: np.ndarray
    truncated: bool = False


@dataclass(frozen=True)
class Failed:
    row: Row
    reason: str
