"""One batch, end to end: load the rows still pending, embed them, write them back.

This is what a worker actor runs. The provider is called outside any
transaction, so no row lock or snapshot is held while waiting on the network.

What goes wrong is charged to whoever is at fault (invariant 8):
- a row the provider or the app's table refuses is recorded failed, alone;
- a database that cannot take the write (disk full, read-only, connection lost)
  costs a pause: the write is retried in-process for `write_retry_seconds`, then
  the vectors are kept in Redis (`embedding.paid`) for the message's retry, so
  they are never bought twice, and no row is marked failed;
- a request the provider refuses whatever the rows (a config error) marks the
  slot misconfigured: nothing more is sent for it, no row is marked failed;
- a row the app holds locked when the write comes is skipped, never waited for
  (invariant 10): its vector is kept in Redis and the next pass writes it; and no app
  transaction waits on the batch's write for long: it commits in slices of about
  `max_row_lock_ms` each (worker.batch_write);
- vectors whose column changed model meanwhile (`init` in place) are dropped, never
  written as the new model's (invariant 7): their rows stay pending, their spend is
  recorded as the model that billed it.

Each text is paid for once per model (`dedupe`, on by default): a row whose text another
row already holds a vector for gets a copy, and a batch sends each distinct text once.
Copies take the same guarded write as bought vectors (invariants 2 and 7).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import psycopg
import redis
from psycopg_pool import ConnectionPool

from pgreembed.config import Settings, Target
from pgreembed.embedding.embed import Outcome, embed_rows, estimate_tokens, too_long_advice
from pgreembed.embedding.paid import PaidVectors
from pgreembed.embedding.providers import make_provider
from pgreembed.embedding.reuse import Distinct, distinct_texts, share_with_twins
from pgreembed.embedding.text_claims import Claimed, NoClaims, TextClaims, claim_seconds
from pgreembed.embedding.throttle import throttle_for
from pgreembed.errors import DatabaseError, MisconfiguredError
from pgreembed.observability.redact import redact
from pgreembed.observability.worker_metrics import failure_kind, worker_metrics
from pgreembed.store import usage as spend
from pgreembed.store.faults import (
    LOST_RIGHT_HINT,
    PREPARED_STATEMENTS_HINT,
    is_lost_right,
    is_prepared_statement_fault,
    retry_database_faults,
)
from pgreembed.store.known import known_vectors
from pgreembed.store.pool import worker_pool
from pgreembed.store.rows import (
    load_pending,
    lock_slot,
    record_usage,
)
from pgreembed.store.slots import Slot, mark_misconfigured
from pgreembed.values import Embedded, Failed
from worker.batch_write import Write, commit_write, slicer_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchReport:
    requested: int
    pending: int
    written: int
    failed: int
    changed_meanwhile: int
    reused: int = 0  # vectors given without a provider call (an identical text's)
    busy: int = 0  # rows the app held locked: left pending, their vectors kept for them
    dropped: int = 0  # vectors not of the column's model any more (changed in place)


@functools.cache
def _redis(url: str) -> redis.Redis:
    return redis.Redis.from_url(url)


def process_batch(settings: Settings, target_name: str, slot_id: int,
                  keys: Sequence[str], claimed_at: Mapping[str, float] | None = None
                  ) -> BatchReport:
    """`claimed_at`: when the scheduler claimed each key (epoch seconds), for the lag
    metric.

    A prepared statement missing from the session (a pooler in transaction mode, with
    `[worker] prepared_statements` on) or a grant revoked while running is the config's
    fault: the vectors are kept as for any database fault, no row is marked failed, and
    the error says what to fix in one line (not only a traceback per retry).
    """
    try:
        return _process_batch(settings, target_name, slot_id, keys, claimed_at)
    except psycopg.Error as exc:
        hint = (LOST_RIGHT_HINT if is_lost_right(exc) else PREPARED_STATEMENTS_HINT
                if is_prepared_statement_fault(exc) else None)
        if hint is None:
            raise
        message = f"target {target_name}: {hint} (Postgres said: {redact(str(exc)).strip()})"
        log.error("%s", message)
        raise DatabaseError(message) from exc


def _process_batch(settings: Settings, target_name: str, slot_id: int,
                   keys: Sequence[str], claimed_at: Mapping[str, float] | None
                   ) -> BatchReport:
    target = settings.target(target_name)
    pool = worker_pool(settings)
    with pool.connection() as conn:
        found = lock_slot(conn, target, slot_id, "ACCESS SHARE")
        # A paused migration stops spending now: queued batches are dropped, their rows
        # stay pending and are dispatched again on resume. So does a misconfigured slot.
        if found is None or found.paused or found.misconfigured:
            return BatchReport(len(keys), 0, 0, 0, 0)
        slot = found
        rows = load_pending(conn, slot, keys)
        # Read under the same lock: the vectors are the slot's model's (see lock_slot).
        known = known_vectors(conn, slot, rows) if target.dedupe and rows else {}
    if not rows:
        return BatchReport(len(keys), 0, 0, 0, 0)

    paid = PaidVectors(_redis(settings.redis_url))
    kept = paid.take(slot, rows)  # vectors bought by an earlier attempt whose write failed
    done = {item.row.pk for item in kept.embedded}
    copied = [Embedded(row, *known[row.content_hash]) for row in rows
              if row.pk not in done and row.content_hash in known]
    done.update(item.row.pk for item in copied)
    rest = [row for row in rows if row.pk not in done]
    distinct = distinct_texts(rest) if target.dedupe else Distinct(sent=rest)
    claims = (TextClaims(_redis(settings.redis_url), slot,
                         claim_seconds(settings.request_timeout))
              if target.dedupe else NoClaims())
    # Leaving it (after the write, or on an error, a cap, a failure) settles the claims:
    # texts bought are marked done (or published to batches waiting), others dropped.
    with claims:
        claimed = claims.claim(distinct.sent)
        if claimed.later:
            _copy_or_take_over(pool, target, slot, claims, claimed, kept.embedded)
        to_embed = claimed.mine
        outcome = Outcome()
        reservation = spend.Reservation(None, None, True)
        if to_embed:
            # `[throttle]`: the app comes first; wait before buying, so no vector waits
            # unwritten.
            throttle_for(settings).admit(len(to_embed))
            provider = make_provider(settings, slot.provider, slot.model, slot.dimensions,
                                     target)
            reservation = spend.reserve(
                pool, slot, lambda: estimate_tokens(provider, to_embed))  # a cap's share
            if not reservation.granted and not (kept.embedded or copied or claimed.copied
                                                or claimed.theirs):
                # The cap is reached (paused) or held by batches in flight.
                return BatchReport(len(keys), len(rows), 0, 0, 0)
            if reservation.granted:
                try:
                    with reservation.released_on_error():
                        outcome = embed_rows(to_embed, provider, truncate=target.truncate,
                                             advice=too_long_advice(target.parent is not None))
                except MisconfiguredError as exc:
                    _misconfigured(pool, target, slot, exc)
                    return BatchReport(len(keys), len(rows), 0, 0, 0)
        claims.publish(outcome.embedded)  # batches waiting on them copy them now
        waited, gone = claims.wait(claimed.theirs)
        bought = len(outcome.embedded)
        outcome.embedded.extend([*claimed.copied, *waited])  # bought by other batches
        gone = [*gone, *claimed.later]
        deferred = sum(1 + len(distinct.twins.get(row.pk, ())) for row in gone)
        reused = len(copied) + len(outcome.embedded) - bought + share_with_twins(outcome,
                                                                                distinct)
        for failure in outcome.failed:
            log.warning("target %s row %s not embedded: %s", target.name, failure.row.pk,
                        failure.reason)
        held = set(kept.reservation_ids)
        if reservation.id is not None:
            held.add(reservation.id)
        write = Write([*kept.embedded, *copied, *outcome.embedded], outcome.failed,
                      kept.tokens + outcome.tokens, held, reused, frozenset(kept.recorded_keys),
                      frozenset(item.row.pk for item in kept.embedded), deferred)
        # A write that fails for good keeps what was paid for (commit_write, at each failed
        # try): the message's retry writes it.
        result = retry_database_faults(
            lambda: commit_write(pool, target, slot, write, reservation, paid,
                                 slicer_for(settings.max_row_lock_ms)),
            settings.write_retry_seconds, f"target {target.name} slot {slot.id}")
        claims.landed(set(result.written.keys) if result.slot is not None else set())
        busy, left = result.written.busy, result.written.left
        # Kept anew by the write (held by the app, or in a slice that did not commit): not
        # to forget. The others were kept by an earlier attempt, or by a failed try of
        # this one that its in-process retry got through.
        kept_again = {item.row.pk for item in [*busy, *left]}
        paid.forget(slot, [item.row for item in write.embedded
                           if item.row.pk not in kept_again])
        if result.slot is None:  # dropped: not the column's model any more, or no column
            return BatchReport(len(keys), len(rows), 0, 0, 0, dropped=len(write.embedded))
        slot, written, refused = result.slot, result.written.keys, result.written.refused
        dropped = len(result.written.dropped)  # later slices, after a model change
        changed = (len(write.embedded) - len(written) - len(refused) - len(busy) - len(left)
                   - dropped)
        failures = [*write.failed, *refused]
        for failure in refused:
            log.warning("target %s row %s not written: %s", target.name, failure.row.pk,
                        failure.reason)
        report = BatchReport(len(keys), len(rows), len(written), len(failures), changed,
                             reused, busy=len(busy) + len(left), dropped=dropped)
        _count(slot, report, write.tokens, failures)  # kept vectors were not counted
        _observe_lag(slot, written, claimed_at)
        log.info("target %s slot %d: %d written (%d of them copied from an identical text),"
                 " %d failed, %d changed meanwhile, %d held by another transaction and %d"
                 " after a slice that failed (kept for the next pass), %d left pending (their"
                 " text's buyer gave up or is writing it), %d dropped (the column's model"
                 " changed) (of %d)",
                 target.name, slot.id, report.written, reused, report.failed, changed,
                 len(busy), len(left), write.deferred, dropped, len(keys))
        return report


def _copy_or_take_over(pool: ConnectionPool, target: Target, slot: Slot,
                       claims: TextClaims, claimed: Claimed, kept: Sequence[Embedded]
                       ) -> None:
    """Texts another batch bought and wrote lately ('done'): copied from Postgres, probed
    again (the batch's first probe may have run before that write), or from a vector this
    batch holds kept for another row of the same text. A text found in neither (its rows
    were edited since) is taken over and bought: there is nothing to copy, and its rows
    were sent back until the mark expired (30 s) before."""
    with pool.connection() as conn:
        current = lock_slot(conn, target, slot.id, "ACCESS SHARE")
        if current is None or not current.holds_vectors_of(slot):
            return  # the column's model changed: the rows stay pending, as before
        found = known_vectors(conn, current, claimed.later)
    for item in kept:  # the slot's model's (embedding.paid keys them by slot and model)
        found.setdefault(item.row.content_hash, (item.vector, item.truncated))
    claimed.copied.extend(Embedded(row, *found[row.content_hash])
                          for row in claimed.later if row.content_hash in found)
    missing = [row for row in claimed.later if row.content_hash not in found]
    taken = {row.pk for row in claims.take_over(missing)}
    claimed.mine.extend(row for row in missing if row.pk in taken)
    claimed.later = [row for row in missing if row.pk not in taken]


def _misconfigured(pool: ConnectionPool, target: Target, slot: Slot,
                   exc: MisconfiguredError) -> None:
    """Stop the slot (no row is at fault) and record what the probe cost."""
    reason = redact(str(exc))
    log.error("target %s column %s (%s) is misconfigured, nothing more is sent for it"
              " until `pgreembed init` after the fix: %s", target.name, slot.vector_column,
              slot.model_key, reason)
    with pool.connection() as conn:
        mark_misconfigured(conn, slot, reason)
        record_usage(conn, slot, 0, exc.tokens)


def _count(slot: Slot, report: BatchReport, tokens: int, failures: Sequence[Failed]) -> None:
    metrics = worker_metrics()
    if metrics is None:
        return
    from pgreembed.embedding.pricing import list_price

    name = slot.target.name
    price = list_price(slot.provider, slot.model, slot.target) or 0.0
    metrics.rows.labels(name, slot.vector_column).inc(report.written)
    metrics.reused.labels(name, slot.vector_column).inc(report.reused)
    metrics.tokens.labels(name, slot.model_key).inc(tokens)
    metrics.cost.labels(name, slot.model_key).inc(tokens / 1e6 * price)
    metrics.changed.labels(name).inc(report.changed_meanwhile)
    for failure in failures:
        metrics.failures.labels(name, failure_kind(failure.reason)).inc()


def _observe_lag(slot: Slot, written: Sequence[object],
                 claimed_at: Mapping[str, float] | None) -> None:
    """Claim-to-committed lag of each row written (see pgreembed.queue.freshness)."""
    metrics = worker_metrics()
    if metrics is None or not claimed_at:
        return
    now = time.time()
    histogram = metrics.lag.labels(slot.target.name, slot.vector_column)
    for key in written:
        claimed = claimed_at.get(str(key))
        if claimed is not None:
            histogram.observe(max(0.0, now - claimed))
