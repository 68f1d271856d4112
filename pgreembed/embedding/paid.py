"""Vectors already paid for, kept while the database cannot take their write.

When a batch's write still fails after its in-process retries (a long disk-full
or read-only spell, a column renamed by hand), its vectors are kept here, one
Redis key per row named by slot, model, row key and text hash, for an hour. The
next attempt at those rows (Dramatiq's retry of the message, or the same rows
in a later batch once the scheduler re-enqueued them) writes these vectors
instead of buying them again (invariant 8). The same goes for the rows a write
skipped because the app held them locked (store.rows.lock_free_rows): their
spend is in the ledger already, so they are kept `recorded`.

Why Redis: it is the store a database outage does not take down with it (a side
table in Postgres fails along with the write it should rescue); the queue
already lives there; keys expire by themselves; and losing them costs a re-embed,
never correctness: a kept vector is used only for the same slot, model and text
hash, and its write is still guarded by that hash (invariants 2 and 7). Why not
in the message: a Dramatiq retry re-enqueues the same message, and the vectors
(6 KB per row at 1536 dims) would ride along with every delivery.

Each row's key also carries its share of the tokens billed and the batch's spend
reservations, so the write that finally lands records the spend and settles the
reservations in its transaction, as a batch written at once does.
"""

from __future__ import annotations

import contextlib
import json
import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import redis

from pgreembed.store.slots import Slot
from pgreembed.values import Embedded, Row

log = logging.getLogger(__name__)

KEEP_SECONDS = 3600
_HEADER = struct.Struct("<I")  # length of the JSON header that precedes the vector


@dataclass
class Kept:
    """Vectors found kept for a batch's rows, the tokens they cost, their reservations."""

    embedded: list[Embedded] = field(default_factory=list)
    tokens: int = 0
    reservation_ids: set[int] = field(default_factory=set)
    # Keys of the rows of `embedded` whose spend the usage ledger has already (kept
    # because the app held their row when their batch was written, or for a later slice
    # of a write, not because the write failed).
    recorded_keys: set[Any] = field(default_factory=set)


class PaidVectors:
    """Keep, find and forget the vectors of rows whose write failed."""

    def __init__(self, client: redis.Redis, namespace: str = "pgreembed",
                 seconds: int = KEEP_SECONDS) -> None:
        self.client = client
        self.namespace = namespace
        self.seconds = seconds

    def _key(self, slot: Slot, row: Row) -> str:
        return f"{self.namespace}:paid:{slot.id}:{slot.model_id}:{row.pk}:{row.content_hash}"

    def keep(self, slot: Slot, embedded: Sequence[Embedded], tokens: int,
             reservation_ids: set[int], recorded: bool = False) -> bool:
        """Keep the vectors (tokens shared out over them); False if Redis failed too.
        `recorded`: their spend is in the usage ledger already (do not count it again)."""
        if not embedded:
            return True
        share, rest = divmod(tokens, len(embedded))
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for i, item in enumerate(embedded):
                    header = json.dumps({"tokens": share + (rest if i == 0 else 0),
                                         "truncated": item.truncated,
                                         "reservations": sorted(reservation_ids),
                                         "model": slot.model_key,
                                         "recorded": recorded}).encode()
                    value = (_HEADER.pack(len(header)) + header
                             + np.asarray(item.vector, dtype="<f4").tobytes())
                    pipe.set(self._key(slot, item.row), value, ex=self.seconds)
                pipe.execute()
        except redis.RedisError as exc:
            log.warning("slot %d: could not keep %d vectors in Redis (%s): they will be"
                        " embedded again", slot.id, len(embedded), type(exc).__name__)
            return False
        log.info("slot %d: %d vectors kept for %d s until their write succeeds", slot.id,
                 len(embedded), self.seconds)
        return True

    def take(self, slot: Slot, rows: Sequence[Row]) -> Kept:
        """The kept vectors of `rows` (same slot, model and text hash); they stay kept
        until `forget`, so a write that fails again loses nothing. The model is in the
        key (its id) and checked again against the header (its key and size): a vector
        is only ever taken for the model that made it (invariant 7)."""
        found = Kept()
        if not rows:
            return found
        try:
            values = self.client.mget([self._key(slot, row) for row in rows])
        except redis.RedisError as exc:
            log.warning("slot %d: kept vectors unreadable (%s)", slot.id, type(exc).__name__)
            return found
        for row, value in zip(rows, values, strict=True):
            if not isinstance(value, bytes):
                continue
            (size,) = _HEADER.unpack_from(value)
            header = json.loads(value[_HEADER.size:_HEADER.size + size])
            vector = np.frombuffer(value[_HEADER.size + size:], dtype="<f4")
            if vector.size != slot.dimensions or header.get("model",
                                                            slot.model_key) != slot.model_key:
                continue
            found.embedded.append(Embedded(row, vector, bool(header["truncated"])))
            if header.get("recorded"):
                found.recorded_keys.add(row.pk)
            found.tokens += int(header["tokens"])
            found.reservation_ids.update(int(i) for i in header["reservations"])
        return found

    def forget(self, slot: Slot, rows: Sequence[Row]) -> None:
        """Their write committed: drop the kept copies (they would expire anyway)."""
        if rows:
            with contextlib.suppress(redis.RedisError):
                self.client.delete(*[self._key(slot, row) for row in rows])
