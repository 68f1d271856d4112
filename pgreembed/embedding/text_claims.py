"""Pay once per text across batches in flight together: a claim per (slot, model, text).

`known_vectors` copies a vector some row already holds, and a batch sends each of its
distinct texts once; but two batches in flight at once that both hold a text nobody has
yet would each buy it (boilerplate chunks whose copies straddle batches did: 325 inputs
for 290 distinct texts). So before buying, a batch claims each of its texts in Redis
(one key per slot, model and text hash, set only if absent):

- absent: the key now holds this batch's claim, and the batch buys the text;
- another batch's claim: that batch is buying it. This batch flags the key as waited
  on, buys its other texts, then waits for the vector and copies it;
- a vector: published for a waiting batch, copied;
- done ('D'): its buyer wrote it lately. The batch copies the vector from Postgres
  (worker.batch probes again: its first probe may have run before that write); if no
  row holds it any more (its rows were edited since: A -> B -> A within DONE_SECONDS),
  the batch takes the claim over and buys it (`take_over`): there is nothing to copy.
  Before, those rows were sent back until the mark expired, 30 s.

A buyer publishes the vectors of waited texts as soon as the provider answers (before
its write: waiters need not wait for it). When it is done (written, or an error, a
spend cap, a failure), texts bought and not waited on become 'D' for DONE_SECONDS (so
a batch that read the rows before that write does not buy them again), and texts it got
no vector for are dropped: a waiter then leaves its rows pending (not failed: the first
buyer's failure is not theirs) and the next batch buys them. Only waited texts carry a
vector in Redis (a backfill of distinct texts would otherwise keep every vector there).
A claim expires after `claim_seconds`, and a waiter stops waiting then, so no row waits
longer than that. A buyer also keeps a short-lived "alive" key while its batch runs
(refreshed by a thread every ALIVE_SECONDS / 3): a waiter that finds it gone (the worker
was killed) drops that claim and leaves its rows pending at once, so a killed worker's
redelivered batch, which meets its own dead claims, waits ALIVE_SECONDS at most, not
`claim_seconds` (the chaos tests waited 90 s per kill before). Redis unreachable: every
text is bought, as before this existed.

Safety is the write's, as for every copy: the key carries the slot and the model's id,
the vector's size is checked, and the write is guarded by the text hash and the column's
model (invariants 2 and 7).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import numpy as np
import redis

from pgreembed.store.slots import Slot
from pgreembed.store.texts import is_no_text
from pgreembed.values import Embedded, Row

log = logging.getLogger(__name__)

PUBLISH_SECONDS = 60  # a published vector, for the batches polling for it (50 ms)
DONE_SECONDS = 30  # a text bought lately: longer than a batch takes from its read to here
POLL_SECONDS = 0.05
ALIVE_SECONDS = 10.0  # a buyer's "alive" key; refreshed every third of it while it runs
# Each key still marked done ('D') becomes this batch's claim (ARGV[1], ARGV[2] ms): 1,
# else 0 (another batch's claim, a vector, or gone meanwhile).
_TAKE_OVER = ("local out = {} for i, key in ipairs(KEYS) do out[i] = 0"
              " if redis.call('GET', key) == 'D' then"
              " redis.call('SET', key, ARGV[1], 'PX', ARGV[2]) out[i] = 1 end end return out")
_DROP_DEAD = ("if redis.call('GET', KEYS[1]) == ARGV[1] then"
              " return redis.call('DEL', KEYS[1]) end return 0")
_CLAIM = (Path(__file__).parent / "text_claim.lua").read_text()
_SETTLE = (Path(__file__).parent / "text_settle.lua").read_text()
_PUBLISH = (Path(__file__).parent / "text_publish.lua").read_text()
_VECTOR, _MINE, _CLAIMED = b"V", b"M", b"C"


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
    later: list[Row] = field(default_factory=list)  # bought and written lately ('D')


def _encode(item: Embedded) -> bytes:
    return (_VECTOR + (b"\x01" if item.truncated else b"\x00")
            + np.asarray(item.vector, dtype="<f4").tobytes())


class TextClaims:
    """One batch's claims on its texts. Use it as a context manager around buying and
    writing: leaving it settles the claims (`close`), whatever happened."""

    def __init__(self, client: redis.Redis, slot: Slot, claim_seconds: float,
                 namespace: str = "pgreembed") -> None:
        self.client = client
        self.slot = slot
        self.claim_seconds = claim_seconds
        self.namespace = namespace
        self.token = _CLAIMED + uuid.uuid4().hex.encode()
        self._held: set[str] = set()
        self._bought: dict[str, Embedded] = {}  # held key -> the vector bought for it
        self._written: set[str] = set()  # of those, the keys whose write committed
        self._alive_stop = threading.Event()
        self._alive_thread: threading.Thread | None = None

    def _alive_key(self, token: bytes) -> str:
        return f"{self.namespace}:text-buyer:{token.decode()}"

    def _keep_alive(self) -> None:
        """Set this batch's alive key now and refresh it until `close` (a thread; once)."""
        if self._alive_thread is not None:
            return
        key, ms = self._alive_key(self.token), int(ALIVE_SECONDS * 1000)
        try:
            self.client.set(key, b"1", px=ms)
        except redis.RedisError:
            return

        def refresh() -> None:
            while not self._alive_stop.wait(ALIVE_SECONDS / 3):
                # On an error its claims may be taken over: a waiter then buys again.
                with contextlib.suppress(redis.RedisError):
                    self.client.set(key, b"1", px=ms)

        self._alive_thread = threading.Thread(target=refresh, daemon=True,
                                              name="pgreembed-text-claims")
        self._alive_thread.start()

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
        if _MINE in values:
            self._keep_alive()
        for row, value in zip(texts, values, strict=True):
            copy = self._vector(row, value) if value.startswith(_VECTOR) else None
            if value == _MINE:
                out.mine.append(row)
                self._held.add(self._key(row))
            elif copy is not None:
                out.copied.append(copy)
            elif value.startswith(_CLAIMED):
                out.theirs.append(row)
            else:
                out.later.append(row)  # done, or a vector of another size (never here)
        return out

    def take_over(self, rows: Sequence[Row]) -> list[Row]:
        """Of `rows` (texts marked done whose vector no row holds any more), those whose
        claim this batch now holds: it buys them. A text another batch claimed meanwhile
        is left to it (its rows stay pending, as before)."""
        if not rows:
            return []
        # Alive before the claims exist: a waiter that met one with no alive key would
        # take its buyer for dead and drop it (then a third batch buys the text too).
        self._keep_alive()
        try:
            won = self.client.register_script(_TAKE_OVER)(
                keys=[self._key(r) for r in rows],
                args=[self.token, int(self.claim_seconds * 1000)])
        except redis.RedisError as exc:
            log.warning("slot %d: text claims unavailable (%s): %d texts left pending",
                        self.slot.id, type(exc).__name__, len(rows))
            return []
        taken = [row for row, got in zip(rows, won, strict=True) if got]
        self._held.update(self._key(row) for row in taken)
        return taken

    def publish(self, embedded: Sequence[Embedded]) -> None:
        """The vectors this batch bought: those of texts other batches wait on go to
        them now (before the write: they need not wait for it); `close` settles the
        rest. Only waited texts travel to Redis (one small read to find them)."""
        for item in embedded:
            if self._key(item.row) in self._held:
                self._bought[self._key(item.row)] = item
        keys = sorted(self._bought)
        if not keys:
            return
        try:
            flags = self.client.mget([f"{k}:w" for k in keys])
        except redis.RedisError:
            return  # `close` tries again
        self._publish([k for k, flag in zip(keys, flags, strict=True) if flag is not None])

    def _publish(self, keys: Sequence[str]) -> None:
        if not keys:
            return
        try:
            self.client.register_script(_PUBLISH)(
                keys=list(keys), args=[self.token, PUBLISH_SECONDS,
                                       *(_encode(self._bought[k]) for k in keys)])
        except redis.RedisError as exc:
            log.warning("slot %d: vectors not published (%s): the batches waiting on them"
                        " leave their rows pending", self.slot.id, type(exc).__name__)
            return
        self._held.difference_update(keys)

    def landed(self, written: Collection[object]) -> None:
        """The rows (keys) whose vectors the write committed: only their texts are marked
        done (a text whose row was not written, edited meanwhile or held by the app, is
        not in Postgres for a later batch to copy)."""
        self._written = {k for k, item in self._bought.items() if item.row.pk in written}

    def close(self) -> None:
        """The batch is done (written, or given up): texts written become done (or go to
        a batch that waits on them), other claims are dropped."""
        self._alive_stop.set()
        keys = sorted(self._held)
        if not keys:
            return
        what = ["W" if k in self._written else "U" if k in self._bought else "N"
                for k in keys]
        try:
            waited = self.client.register_script(_SETTLE)(
                keys=keys, args=[self.token, *what, DONE_SECONDS])
        except redis.RedisError as exc:  # the claims expire after claim_seconds
            log.warning("slot %d: text claims not settled (%s)", self.slot.id,
                        type(exc).__name__)
            return
        self._publish([k for k, flag in zip(keys, waited, strict=True) if flag])
        self._held.clear()

    def wait(self, rows: Sequence[Row]) -> tuple[list[Embedded], list[Row]]:
        """(copies, rows given up on) for `rows` claimed by other batches: each is copied
        once its buyer publishes it, or given up on when its buyer is done without
        publishing it (it dropped the claim, or wrote it), or the claim expired: those
        rows stay pending for the scheduler to send again."""
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
            dead = self._dead_buyers(values)
            still = []
            for row, value in zip(waiting, values, strict=True):
                copy = (self._vector(row, value) if isinstance(value, bytes)
                        and value.startswith(_VECTOR) else None)
                if copy is not None:
                    copies.append(copy)
                elif isinstance(value, bytes) and value in dead:
                    self._drop_dead(self._key(row), value)
                    gone.append(row)  # its buyer was killed: pending, sent again
                elif isinstance(value, bytes) and value.startswith(_CLAIMED):
                    still.append(row)  # its buyer is still at the provider
                else:
                    gone.append(row)
            waiting = still
            if waiting:
                time.sleep(POLL_SECONDS)
        return copies, [*gone, *waiting]

    def _dead_buyers(self, values: Sequence[object]) -> set[bytes]:
        """The claim tokens among `values` whose buyer's alive key is gone."""
        tokens = sorted({v for v in values if isinstance(v, bytes) and v.startswith(_CLAIMED)})
        if not tokens:
            return set()
        try:
            alive = self.client.mget([self._alive_key(t) for t in tokens])
        except redis.RedisError:
            return set()
        return {t for t, found in zip(tokens, alive, strict=True) if found is None}

    def _drop_dead(self, key: str, token: bytes) -> None:
        with contextlib.suppress(redis.RedisError):  # else it expires after claim_seconds
            self.client.eval(_DROP_DEAD, 1, key, token)

    def __enter__(self) -> TextClaims:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class NoClaims(TextClaims):
    """`dedupe = false`: every row is the batch's own to buy."""

    def __init__(self) -> None:
        self._held = set()
        self.claim_seconds = 0.0

    def claim(self, rows: Sequence[Row]) -> Claimed:
        return Claimed(mine=list(rows))

    def take_over(self, rows: Sequence[Row]) -> list[Row]:
        return list(rows)

    def publish(self, embedded: Sequence[Embedded]) -> None:
        return None

    def close(self) -> None:
        return None

    def landed(self, written: Collection[object]) -> None:
        return None
