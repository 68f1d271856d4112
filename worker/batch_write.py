"""A batch's write transactions: its vectors, failures, billed tokens and settled
reservations together in the first, the rest of its vectors in slices of their own, so
the app's rows are held briefly (store.write_slices); what is not written stays kept in
Redis (embedding.paid), paid once."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from pgreembed.config import Target
from pgreembed.embedding.paid import PaidVectors
from pgreembed.observability.redact import redact
from pgreembed.store import usage as spend
from pgreembed.store.rows import Written, lock_slot, record_failures, record_usage, write_isolating
from pgreembed.store.signals import wake_scheduler
from pgreembed.store.slots import Slot
from pgreembed.store.write_slices import WriteSlicer, column_of, slice_cost
from pgreembed.values import Embedded, Failed

log = logging.getLogger(__name__)


@dataclass
class Write:
    """What one batch has to commit: vectors (bought now, kept from a failed write, or
    copied from an identical text's), rows that failed, tokens billed and the spend
    reservations to settle with them."""

    embedded: list[Embedded]
    failed: list[Failed]
    tokens: int
    reservation_ids: set[int]
    reused: int = 0  # of `embedded`, the vectors not bought for their row
    recorded_keys: frozenset[Any] = frozenset()  # kept vectors whose spend the ledger has
    kept: frozenset[Any] = frozenset()  # keys of the rows whose vectors were kept before
    deferred: int = 0  # rows whose text another batch was buying and did not publish

    def record_usage(self, conn: psycopg.Connection, slot: Slot) -> None:
        record_usage(conn, slot, len(self.embedded) - self.reused - len(self.recorded_keys),
                     self.tokens, self.reused)


@dataclass(frozen=True)
class Committed:
    """What one write transaction did: the column it wrote (None: none, the vectors were
    dropped), and its `Written`."""

    slot: Slot | None
    written: Written


def _keep_unwritten(paid: PaidVectors, slot: Slot, write: Write) -> None:
    """Not a row's fault: keep what was paid for, the message's retry writes it. Vectors
    whose spend the ledger has already stay marked so (counted once)."""
    recorded = [item for item in write.embedded if item.row.pk in write.recorded_keys]
    paid.keep(slot, [item for item in write.embedded if item.row.pk not in write.recorded_keys],
              write.tokens, write.reservation_ids)
    paid.keep(slot, recorded, 0, set(), recorded=True)


def commit_write(pool: ConnectionPool, target: Target, slot: Slot, write: Write,
                 reservation: spend.Reservation, paid: PaidVectors, slicer: WriteSlicer
                 ) -> Committed:
    """The batch's first write transaction: its first slice of vectors, the failures, the
    billed tokens and the settled reservations, together; then the other slices, each in
    a transaction of its own (`_write_slices`). `slot` is the slot as read when the
    vectors were bought or copied: they are written only if the column still belongs to
    its model.

    The first transaction keeps the later slices' vectors in Redis, spend recorded, before
    it commits: a worker killed between slices leaves them for the next pass, paid once.
    If that transaction fails (not a row's fault), every vector of the batch is kept at
    once as paid for and not counted, for the message's retry: the retries of a database
    fault may last minutes, and a worker killed meanwhile must not leave them marked as
    counted.
    """
    try:
        return _commit_first(pool, target, slot, write, reservation, paid, slicer)
    except psycopg.Error:
        _keep_unwritten(paid, slot, write)
        raise


def _commit_first(pool: ConnectionPool, target: Target, slot: Slot, write: Write,
                  reservation: spend.Reservation, paid: PaidVectors, slicer: WriteSlicer
                  ) -> Committed:
    with pool.connection() as conn:
        # The vectors belong to the slot's model, not to a column name: a swap or rollback
        # may have renamed the columns while we waited on the provider, and `init` may
        # have changed the slot's model in place (invariant 7).
        current = lock_slot(conn, target, slot.id, "ROW EXCLUSIVE")
        if current is None or not current.holds_vectors_of(slot):
            _dropped(conn, target, slot, current, len(write.embedded))
            write.record_usage(conn, slot)  # billed as the model that billed them
            reservation.settle(conn)
            spend.settle_ids(conn, write.reservation_ids)
            return Committed(None, Written())
        column = column_of(current)
        first, later = slicer.take(column, write.embedded)
        # The later slices' vectors kept, spend recorded (in this transaction): if Redis
        # cannot keep them, they are written now, in one transaction as before.
        if later and not paid.keep(current, later, 0, set(), recorded=True):
            first, later = write.embedded, []
        # The bookkeeping first: the rows written are locked from their write to the
        # commit only (an app transaction that reaches one of them meanwhile waits on us).
        write.record_usage(conn, current)
        reservation.settle(conn)  # in the same transaction as the billed tokens
        spend.settle_ids(conn, write.reservation_ids)  # this attempt's and kept ones'
        started = time.monotonic()
        written = write_isolating(conn, current, first)
        slicer.observe(column, slice_cost(written), time.monotonic() - started)
        record_failures(conn, current, [*write.failed, *written.refused])
        # Kept before the commit that wakes the scheduler: the next pass finds them.
        if written.busy:
            paid.keep(current, written.busy, 0, set(), recorded=True)
        if _to_redo(first, written, write.kept) or write.deferred:
            # Their text changed while we embedded, the app holds them, or their text's
            # buyer gave up: redo them now.
            wake_scheduler(conn, target.name)
    if later:
        written = written.add(_write_slices(pool, target, slot, later, write.kept, paid,
                                            slicer))
    return Committed(current, written)


def _write_slices(pool: ConnectionPool, target: Target, slot: Slot, items: list[Embedded],
                  kept: frozenset[Any], paid: PaidVectors, slicer: WriteSlicer) -> Written:
    """The batch's later slices, kept in Redis and recorded by its first transaction: each
    in a transaction of its own, forgotten once it commits. A database fault stops here
    (not retried in-process: the scheduler's next pass writes what is left from Redis,
    paid once); so does a column whose model changed meanwhile (the rows stay pending)."""
    done = Written()
    while items:
        try:
            with pool.connection() as conn:
                current = lock_slot(conn, target, slot.id, "ROW EXCLUSIVE")
                if current is None or not current.holds_vectors_of(slot):
                    _dropped(conn, target, slot, current, len(items))
                    paid.forget(slot, [item.row for item in items])
                    return done.add(Written(dropped=items))
                column = column_of(current)
                piece, rest = slicer.take(column, items)
                started = time.monotonic()
                written = write_isolating(conn, current, piece)
                record_failures(conn, current, written.refused)
                if _to_redo(piece, written, kept):
                    wake_scheduler(conn, target.name)
        except psycopg.Error as exc:
            log.warning("target %s slot %d: the write stopped after %d rows, %d vectors kept"
                        " for the next pass: %s", target.name, slot.id, len(done.keys),
                        len(items), redact(str(exc)).strip())
            return done.add(Written(left=items))
        slicer.observe(column, slice_cost(written), time.monotonic() - started)
        busy = {item.row.pk for item in written.busy}  # still kept, for the next pass
        paid.forget(slot, [item.row for item in piece if item.row.pk not in busy])
        done, items = done.add(written), rest
    return done


def _to_redo(items: Sequence[Embedded], written: Written, kept: frozenset[Any]) -> bool:
    """Whether the scheduler should pass again now: rows whose text changed while we
    embedded, or the app holds (unless held again: an app session idle in its
    transaction waits for the poll)."""
    changed = len(items) - len(written.keys) - len(written.refused) - len(written.busy)
    return changed > 0 or any(item.row.pk not in kept for item in written.busy)


def _dropped(conn: psycopg.Connection, target: Target, slot: Slot, current: Slot | None,
             count: int) -> None:
    """Vectors not written: the column's model changed while they were embedded."""
    if current is None:
        return
    log.warning("target %s column %s: %d vectors of %s dropped, the column's model changed"
                " to %s while they were embedded; their rows stay pending", target.name,
                current.vector_column, count, slot.model_key, current.model_key)
    wake_scheduler(conn, target.name)


@functools.cache
def slicer_for(max_row_lock_ms: float) -> WriteSlicer:
    """The worker process's slicer for `[worker] max_row_lock_ms`: the measured pace is the
    process's own."""
    return WriteSlicer(max_row_lock_ms / 1000)
