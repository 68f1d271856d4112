"""`migrate swap`: exchange the live and new columns' names (and their indexes' names).

The application keeps querying the same column name. Both columns stay maintained after
a swap (the trigger clears both on a text change and the scheduler fills both), so a
rollback is the same swap backwards, instant and still correct.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg
from psycopg import sql

from pgreembed.config import Settings, Target
from pgreembed.errors import MigrationError, WaitTimeoutError
from pgreembed.migrations import app_objects, rebind
from pgreembed.migrations.crash_point import crash_point
from pgreembed.migrations.index import column_indexes
from pgreembed.migrations.state import (
    SWAP_COLUMN,
    open_migration,
    refuse_if_clearing,
    require_open,
)
from pgreembed.store.blockers import ACCESS_EXCLUSIVE
from pgreembed.store.pool import connect
from pgreembed.store.setup import ensure_pending_index
from pgreembed.store.slots import Slot, app_table, load_slots
from pgreembed.store.table_lock import LockPolicy, run_locked
from pgreembed.store.triggers import recompile_clear_function
from pgreembed.store.trusted_sql import NO_PARAMS
from pgreembed.store.usage import SPEND_CAP

# Rows searchable now that a swap may leave unsearchable for the seconds the workers take to
# embed them for the new live model: about what one worker round trip fills. Under a steady
# write load the incoming column trails the live one by rows in flight; waiting for zero
# would never end (measured: 4-285 such rows at 20-150 updates/s).
DEFAULT_MAX_UNSEARCHABLE = 100


@dataclass(frozen=True)
class Readiness:
    """What stands between `incoming` and becoming live.

    `unsearchable`: rows with a vector in the live column and none in the incoming one,
    failed rows aside: they would drop out of search results until re-embedded. Rows NULL
    in both columns (just inserted or edited) are pending before and after alike.
    `failed`: rows searchable now whose incoming embedding failed for their current text.
    `problems`: what waiting cannot fix (indexes).
    """

    unsearchable: int
    failed: int
    problems: list[str]


def _unsearchable_counts(conn: psycopg.Connection, live: Slot, incoming: Slot
                         ) -> tuple[int, int]:
    """(unsearchable, failed) as defined by Readiness; found through the incoming
    column's partial pending index, so it stays fast enough to run under the swap lock."""
    row = conn.execute(sql.SQL(
        """
        SELECT count(*) FILTER (WHERE NOT {failed}), count(*) FILTER (WHERE {failed})
        FROM {rows}
        WHERE a.{incoming} IS NULL AND a.{live} IS NOT NULL
        """).format(failed=incoming.failed(),
                    rows=incoming.rows_with_state(outer=True), incoming=incoming.vector,
                    live=live.vector), NO_PARAMS).fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def readiness(conn: psycopg.Connection, live: Slot, incoming: Slot, *,
              check_indexes: bool = True) -> Readiness:
    """Whether `incoming` may replace `live` now (see Readiness)."""
    unsearchable, failed = _unsearchable_counts(conn, live, incoming)
    return Readiness(unsearchable, failed,
                     index_problems(conn, live, incoming) if check_indexes else [])


def index_problems(conn: psycopg.Connection, live: Slot, incoming: Slot) -> list[str]:
    """Why the app's queries would lose their index if `incoming` became live."""
    problems = []
    incoming_indexes = column_indexes(conn, incoming)
    invalid = [i.name for i in incoming_indexes if not i.valid]
    if invalid:
        problems.append(f"index {', '.join(invalid)} on {incoming.vector_column} is INVALID:"
                        " run `migrate index` again")
    live_distances = {i.distance for i in column_indexes(conn, live) if i.distance}
    if live_distances and not incoming_indexes:
        problems.append(f"{live.vector_column} has an index but {incoming.vector_column} has"
                        " none: run `migrate index`")
    served = {i.distance for i in incoming_indexes if i.valid and i.distance}
    unserved = sorted(live_distances - served)
    if incoming_indexes and unserved:
        # The app queries with the live index's operator: after the swap it would scan.
        problems.append(f"{live.vector_column} is indexed for {', '.join(unserved)} distance but"
                        f" no index on {incoming.vector_column} is: run `migrate index"
                        f" --distance {unserved[0]}`")
    return problems


def _exchange(conn: psycopg.Connection, live: Slot, other: Slot, other_role: str) -> None:
    """Exchange the two columns' names, their ANN indexes' names and their roles.

    Renaming a column does not rename its index, so an application's index name
    (say docs_embedding_idx) is moved onto the column that becomes live.
    """
    live_indexes = [i.name for i in column_indexes(conn, live)]
    other_indexes = [i.name for i in column_indexes(conn, other)]
    rename = sql.SQL("ALTER TABLE {} RENAME COLUMN {} TO {}")
    conn.execute(rename.format(live.table, live.vector, sql.Identifier(SWAP_COLUMN)))
    conn.execute(rename.format(live.table, other.vector, live.vector))
    conn.execute(rename.format(live.table, sql.Identifier(SWAP_COLUMN), other.vector))
    if len(live_indexes) == 1 and len(other_indexes) == 1:
        schema = live.target.schema
        index_rename = sql.SQL("ALTER INDEX {} RENAME TO {}")
        conn.execute(index_rename.format(sql.Identifier(schema, live_indexes[0]),
                                         sql.Identifier(SWAP_COLUMN)))
        conn.execute(index_rename.format(sql.Identifier(schema, other_indexes[0]),
                                         sql.Identifier(live_indexes[0])))
        conn.execute(index_rename.format(sql.Identifier(schema, SWAP_COLUMN),
                                         sql.Identifier(other_indexes[0])))
    # The registry follows: each slot keeps its state table, model and pending index.
    conn.execute("UPDATE pgreembed.slots SET role = %s, vector_column = %s WHERE id = %s",
                 (other_role, other.vector_column, live.id))
    conn.execute("UPDATE pgreembed.slots SET role = 'live', vector_column = %s WHERE id = %s",
                 (live.vector_column, other.id))
    if live.vector_type != other.vector_type:
        # The clear trigger's plans (cached per session) typed the column by its old type.
        recompile_clear_function(conn, live.target)


@dataclass(frozen=True)
class SwapResult:
    attempts: int  # lock attempts (each waited at most the policy's lock_timeout)
    pause_seconds: float  # ACCESS EXCLUSIVE held: from the lock granted to the commit
    waited_seconds: float  # from the call to the commit (catching up and lock attempts)
    unsearchable: int  # rows left unsearchable for the seconds until they are embedded
    already_done: bool = False  # run again after its commit (a crash): nothing to do
    # The app's views, functions and policies kept on the column they name (app_objects).
    kept: tuple[app_objects.Decision, ...] = ()


@dataclass(frozen=True)
class SwapWait:
    """Progress while a swap waits for the incoming column to catch up."""

    seconds: float
    unsearchable: int
    allowed: int


class _NotReady(Exception):
    """Rows changed between the check and the lock: roll back, wait again."""


def _pair(conn: psycopg.Connection, target: Target) -> tuple[Slot, Slot]:
    slots = load_slots(conn, target)
    live = next(s for s in slots if s.role == "live")
    other = next(s for s in slots if s.role in ("next", "old"))
    return live, other


def _paused_refusal(conn: psycopg.Connection, target: Target, other: Slot,
                    unsearchable: int, allowed: int, step: str) -> str | None:
    """Why the incoming column will not catch up, when nothing fills it while it is paused
    (the workers' queue; a Batch API or derived fill ignores the pause): a backlog side
    fill's previous column at a rollback, or a pause by the operator or the spend cap.
    None otherwise (a side fill's column while its vectors are copied, a column a pgai
    worker holds): the wait goes on as before."""
    row = conn.execute(
        "SELECT s.paused_by, m.id, m.auto_reason FROM pgreembed.slots s"
        " JOIN pgreembed.migrations m ON m.to_slot = s.id OR m.from_slot = s.id"
        " WHERE s.id = %s ORDER BY m.id DESC LIMIT 1", (other.id,)).fetchone()
    paused_by, migration, reason = row if row else (None, None, None)
    lost = (f"{unsearchable} rows searchable now have no vector in {other.vector_column},"
            f" which is paused: nothing fills it, and a {step} would drop them from search"
            f" (allowed: {allowed}, --max-unsearchable)")
    if reason == "backlog" and step == "rollback":
        return (f"{lost}. Side fill {migration} (backlog) swapped in a column of the same"
                f" model, {other.model_key}: there is no other model to roll back to. Its"
                " previous column stayed paused while the backlog was filled beside it"
                " (writing it through that column's index is what the side fill avoids),"
                " and the scheduler drops it after [side_fill] grace_seconds; to roll back"
                " anyway, pass --max-unsearchable above that count")
    if step == "rollback":
        return None  # `migrate resume` is for a migration still filling
    if paused_by == SPEND_CAP:
        return (f"{lost}: its spend cap paused it; `pgreembed migrate resume --target"
                f" {target.name} --spend-cap USD` with a higher cap, then {step} again")
    if paused_by == "operator":
        return (f"{lost}: `pgreembed migrate pause` paused it; `pgreembed migrate resume"
                f" --target {target.name}`, then {step} again")
    return None


def _incoming_pending_index(settings: Settings, target: Target, phases: tuple[str, ...]
                            ) -> None:
    """The incoming column's pending index, if it has none yet (made at `migrate index`,
    which a swap of a column without an ANN index skips): the wait and the count under
    the lock read it, and so does the scheduler once the column is live."""
    with connect(settings.database_url, autocommit=True) as conn:
        require_open(conn, target, *phases)
        ensure_pending_index(conn, _pair(conn, target)[1])


def swap(settings: Settings, target: Target, *, rollback: bool = False,
         catch_up_timeout: float = 300.0, max_unsearchable: int = DEFAULT_MAX_UNSEARCHABLE,
         accept_failed: bool = False, policy: LockPolicy | None = None,
         on_wait: Callable[[SwapWait], None] | None = None) -> SwapResult:
    """Make the other column live in one short transaction.

    Waits, holding no lock, until at most `max_unsearchable` rows that are searchable now
    would not be after the swap (see Readiness), then takes the table lock with short,
    jittered attempts (table_lock), re-counts under the lock and renames. Rows that failed
    in the incoming column stop it at once unless `accept_failed`. A rollback is the same
    swap backwards; it checks no index: the kept column still has the indexes it had.
    """
    phases = ("swapped",) if rollback else ("filling", "rolled_back")
    step = "rollback" if rollback else "swap"
    done_phase = "rolled_back" if rollback else "swapped"
    with connect(settings.database_url) as conn:
        migration = open_migration(conn, target)
        conn.rollback()
    if migration is not None and migration.phase == done_phase:
        return SwapResult(0, 0.0, 0.0, 0, already_done=True)  # re-run after a crash
    _incoming_pending_index(settings, target, phases)
    asked = time.monotonic()
    deadline = asked + catch_up_timeout
    attempts = 0

    def count_busy(attempt: int, _: object) -> None:
        nonlocal attempts
        attempts = attempt

    while True:
        with connect(settings.database_url) as conn:
            require_open(conn, target, *phases)
            live, other = _pair(conn, target)
            refuse_if_clearing(conn, other, step)
            # The app's objects that cannot be kept on their column: refused before waiting.
            checked = rebind.check(conn, live, other, step)
            ready = readiness(conn, live, other, check_indexes=not rollback)
            stalled = (_paused_refusal(conn, target, other, ready.unsearchable,
                                       max_unsearchable, step)
                       if other.paused and other.mode == "queue"
                       and ready.unsearchable > max_unsearchable else None)
            conn.rollback()
        if stalled:  # waiting would only end in the timeout, blaming the workers
            raise MigrationError(stalled)
        if ready.problems:
            raise MigrationError("; ".join(ready.problems))
        if ready.failed and not accept_failed:
            raise MigrationError(
                f"{ready.failed} rows searchable now failed to embed in"
                f" {other.vector_column} ({other.model_key}) and would drop out of search:"
                f" see `pgreembed failures --target {target.name} --column"
                f" {other.vector_column}`; fix them and add --retry, or pass --accept-failed")
        waited = time.monotonic() - asked
        if ready.unsearchable > max_unsearchable:
            if time.monotonic() > deadline:
                raise WaitTimeoutError(
                    f"{ready.unsearchable} rows still have a vector in {live.vector_column}"
                    f" but none in {other.vector_column} after {waited:.0f} s (allowed:"
                    f" {max_unsearchable}); the workers are not keeping up (`pgreembed"
                    " status`): try again, or raise --timeout or --max-unsearchable")
            if on_wait is not None:
                on_wait(SwapWait(waited, ready.unsearchable, max_unsearchable))
            time.sleep(0.5)
            continue
        locked_at = 0.0
        kept: list[app_objects.Decision] = []

        def exchange(conn: psycopg.Connection, checked: rebind.Checked = checked) -> int:
            nonlocal locked_at, kept
            # The migration's row before the table: pauses and spend reservations lock it
            # and then the slot, and must never wait on a swap that holds the table.
            migration = require_open(conn, target, *phases, lock=True)
            rebind.lock_views(conn, checked)  # the app's views first, as its queries do
            conn.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(
                app_table(target)))
            locked_at = time.monotonic()
            live, other = _pair(conn, target)
            refuse_if_clearing(conn, other, step)
            unsearchable, failed = _unsearchable_counts(conn, live, other)
            if unsearchable > max_unsearchable or (failed and not accept_failed):
                raise _NotReady()
            captured = rebind.capture(conn, live, other, checked)  # before the names move
            _exchange(conn, live, other, "old")
            kept = captured.apply(conn)  # each app object back on the column it names
            # A side fill's step is recorded in the same commit (a crash cannot split them).
            conn.execute("UPDATE pgreembed.migrations SET phase = %s, swapped_at = now(),"
                         " auto_step = CASE WHEN auto_reason IS NULL OR %s THEN auto_step"
                         " ELSE 'swapped' END WHERE id = %s", (done_phase, rollback,
                                                                migration.id))
            conn.execute("UPDATE pgreembed.slots SET paused = false, paused_by = NULL"
                         " WHERE id = %s", (other.id,))
            return unsearchable

        try:
            left = run_locked(settings.database_url, app_table(target), step, exchange, policy,
                              mode=ACCESS_EXCLUSIVE,
                              on_busy=count_busy)
        except (_NotReady, rebind.ObjectsChanged):
            continue  # rows or app objects changed between the check and the lock
        crash_point(step)
        done = time.monotonic()
        return SwapResult(attempts + 1, done - locked_at, done - asked, left,
                          kept=tuple(kept))
