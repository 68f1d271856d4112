"""Pay once per text across batches in flight together: a claim per (slot, model, text).

`known_vectors` copies a vector some row already holds, and a batch sends each of its
distinct texts once; but two batches in flight at once that both hold a text nobody has
yet would each buy it (boilerplate chunks whose copies straddle batches did: 325 inputs
for 290 distinct texts). So before buying, a batch claims each of its texts in Redis
(one key per slot, model and text hash, set only if absent):

- absent: the key now holds this batch's claim, and the batch buys the text;
- a vector: another batch bought it (published below): copied, no provider call;
- another batch's claim: that batch is buying it. This batch buys the rest, then waits
  for the vector to be published and copies it.

A buyer publishes its vectors in the key (replacing its claim) as soon as the provider
answers, before its write, and drops its claims on the texts it did not get a vector for
(failed rows, a provider error, a spend cap): a waiting batch then leaves those rows
pending (not failed: the first buyer's failure is not theirs) and the scheduler sends
them again, where they are claimed and bought (or found written). A claim expires after
`claim_seconds` (a crashed worker's), and a waiter stops waiting then, so no row waits
longer than that. Redis unreachable: every text is bought, as before this existed.

Safety is the write's, as for every copy: the key carries the slot and the model's id,
the vector's size is checked, and the write is guarded by the text hash and the column's
model (invariants 2 and 7).
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import numpy as np
import redis

from pgreembed.store.slots import Slot
from pgreembed.store.texts import is_no_text
from pgreembed.values import Embedded, Row

log = logging.getLogger(__name__)

PUBLISH_SECONDS = 300  # a published vector outlives every batch that could wait on it
POLL_SECONDS = 0.05
_CLAIM = (Path(__file__).parent / "text_claim.lua").read_text()
_RELEASE = (Path(__file__).parent / "text_release.lua").read_text()
_VECTOR, _MINE = b"V", b"M"


def claim_seconds(request_timeout: float) -> float:
    """How long a claim holds: one provider request and then some. A buyer slower than
    that (long 429 back-offs) may see its text bought again by a waiter: a bounded cost,
    where waiting longer would hold the waiter's rows."""
    return request_timeout + 30.0


@dataclass
class Claimed:
    """A batch's distinct rows, sorted by who pays for their text."""

    mine: list[Row] = field(default_factory=list)  # this batch buys them
    copied: list[Embedded] = field(default_factory=list)  # another batch bought them
    theirs: list[Row] = field(default_factory=list)  # another batch is buying them


def _encode(item: Embedded) -> bytes:
    return (_VECTOR + (b"\x01" if item.truncated else b"\x00")
            + np.asarray(item.vector, dtype="<f4").tobytes())


class TextClaims:
    """One batch's claims on its texts (use as a context manager: leaving it drops the
    claims that were not turned into vectors)."""

    def __init__(self, client: redis.Redis, slot: Slot, claim_seconds: float,
                 namespace: str = "pgreembed") -> None:
        self.client = client
        self.slot = slot
        self.claim_seconds = claim_seconds
        self.namespace = namespace
        self.token = b"C" + uuid.uuid4().hex.encode()
        self._held: set[str] = set()

    def _key(self, row: Row) -> str:
        return (f"{self.namespace}:text:{self.slot.id}:{self.slot.model_id}:"
                f"{row.content_hash}")

    def _vector(self, row: Row, value: bytes) -> Embedded | None:
        vector = np.frombuffer(value[2:], dtype="<f4")
        if vector.size != self.slot.dimensions:
            return None
        return Embedded(row, vector, value[1:2] == b"\x01")

    def claim(self, rows: Sequence[Row]) -> Claimed:
        """Sort `rows` (one per distinct text) by who pays; rows without text are this
        batch's (each is recorded failed with its own reason)."""
        out = Claimed()
        texts = [r for r in rows if r.text is not None and not is_no_text(r.text)]
        out.mine = [r for r in rows if r.text is None or is_no_text(r.text)]
        if not texts:
            return out
        try:
            values = self.client.register_script(_CLAIM)(
                keys=[self._key(r) for r in texts],
                args=[self.token, int(self.claim_seconds * 1000)])
        except redis.RedisError as exc:
            log.warning("slot %d: text claims unavailable (%s): the batch buys its texts",
                        self.slot.id, type(exc).__name__)
            out.mine.extend(texts)
            return out
        for row, value in zip(texts, values, strict=True):
            copy = self._vector(row, value) if value.startswith(_VECTOR) else None
            if value == _MINE:
                out.mine.append(row)
                self._held.add(self._key(row))
            elif copy is not None:
                out.copied.append(copy)
            elif value.startswith(_VECTOR):
                out.mine.append(row)  # another size: not this model's vector (never here)
            else:
                out.theirs.append(row)
        return out

    def publish(self, embedded: Sequence[Embedded]) -> None:
        """The vectors this batch bought, for the batches waiting on their texts (before
        the write: they need not wait for it)."""
        items = [item for item in embedded if self._key(item.row) in self._held]
        if not items:
            return
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for item in items:
                    pipe.set(self._key(item.row), _encode(item), ex=PUBLISH_SECONDS)
                pipe.execute()
        except redis.RedisError as exc:
            log.warning("slot %d: vectors not published (%s): batches waiting on them"
                        " leave their rows pending", self.slot.id, type(exc).__name__)
            return
        self._held.difference_update(self._key(item.row) for item in items)

    def wait(self, rows: Sequence[Row]) -> tuple[list[Embedded], list[Row]]:
        """(copies, rows given up on) for `rows` claimed by other batches: each is copied
        once its buyer publishes it, or given up on when the buyer dropped its claim or
        it expired (those rows stay pending for the scheduler to send again)."""
        copies: list[Embedded] = []
        gone: list[Row] = []
        waiting = list(rows)
        if not waiting:
            return copies, gone
        deadline = time.monotonic() + self.claim_seconds
        while waiting and time.monotonic() < deadline:
            try:
                values = self.client.mget([self._key(r) for r in waiting])
            except redis.RedisError:
                break
            still = []
            for row, value in zip(waiting, values, strict=True):
                copy = (self._vector(row, value) if isinstance(value, bytes)
                        and value.startswith(_VECTOR) else None)
                if copy is not None:
                    copies.append(copy)
                elif isinstance(value, bytes) and value.startswith(b"C"):
                    still.append(row)  # its buyer is still at the provider
                else:
                    gone.append(row)
            waiting = still
            if waiting:
                time.sleep(POLL_SECONDS)
        return copies, [*gone, *waiting]

    def release(self) -> None:
        """Drop the claims still held (texts this batch did not get a vector for)."""
        if not self._held:
            return
        with contextlib.suppress(redis.RedisError):  # else they expire after claim_seconds
            self.client.register_script(_RELEASE)(keys=sorted(self._held), args=[self.token])
        self._held.clear()

    def __enter__(self) -> TextClaims:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


class NoClaims(TextClaims):
    """`dedupe = false`: every row is the batch's own to buy."""

    def __init__(self) -> None:
        self._held = set()
        self.claim_seconds = 0.0

    def claim(self, rows: Sequence[Row]) -> Claimed:
        return Claimed(mine=list(rows))

    def publish(self, embedded: Sequence[Embedded]) -> None:
        return None
