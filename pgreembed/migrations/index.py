"""`migrate index`: the new column's ANN index, built CONCURRENTLY like the live one's."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass

import psycopg
from psycopg import sql

from pgreembed.config import Settings, Target
from pgreembed.config.distances import canonical_distance, opclass_distance
from pgreembed.errors import MigrationError
from pgreembed.migrations.crash_point import crash_point
from pgreembed.migrations.index_progress import BuildWatcher, IndexBuild
from pgreembed.migrations.state import refuse_if_clearing, require_open, slots_by_id
from pgreembed.store import catalog, server_versions
from pgreembed.store.index_builds import sole_builder
from pgreembed.store.pool import connect
from pgreembed.store.session import lift_statement_limits
from pgreembed.store.setup import ensure_pending_index
from pgreembed.store.slots import Slot

log = logging.getLogger(__name__)


def ann_index_name(slot: Slot) -> str:
    return f"pgreembed_ann_{slot.id}"


def index_defaults(conn: psycopg.Connection, live: Slot, method: str | None = None,
                   distance: str | None = None) -> tuple[str, str]:
    """(method, distance) for the new column's index: as asked, else as the live column's
    ANN index (the app's queries use its operator), else hnsw + the target's distance."""
    live_ann = [i for i in column_indexes(conn, live) if i.valid and i.distance]
    method = method or (live_ann[0].method if live_ann else "hnsw")
    distance = canonical_distance(
        distance or (live_ann[0].distance if live_ann else None) or live.target.distance)
    return method, distance


def prepare_build_session(conn: psycopg.Connection, maintenance_work_mem: str,
                          parallel_workers: int | None) -> None:
    """The session settings of an index build (its own connection: they end with it);
    `parallel_workers` None keeps the server's max_parallel_maintenance_workers. No
    statement timeout: a role's would cancel every build of a big table."""
    lift_statement_limits(conn)  # again for bench.index_workers, which calls this alone
    conn.execute(sql.SQL("SET maintenance_work_mem = {}").format(
        sql.Literal(maintenance_work_mem)))
    if parallel_workers is not None:
        conn.execute(sql.SQL("SET max_parallel_maintenance_workers = {}").format(
            sql.Literal(parallel_workers)))
    # Vectors are TOASTed, so the table's main heap is small and the planner
    # (plan_create_index_workers) would start no parallel worker at all: a 20k x 1536
    # build took 58-61 s with 0, 1 or 7 workers allowed, 29 s with this and 1 or 2
    # (bench.index_workers).
    conn.execute("SET min_parallel_table_scan_size = 0")


def _ann_index(conn: psycopg.Connection, slot: Slot, name: str) -> ColumnIndex | None:
    return next((i for i in column_indexes(conn, slot) if i.name == name), None)


def _as_asked(index: ColumnIndex | None, method: str, distance: str) -> bool:
    return (index is not None and index.valid
            and (index.method, index.distance) == (method, distance))


def _built(conn: psycopg.Connection, slot: Slot, name: str, method: str, distance: str
           ) -> bool:
    """Both of the column's indexes are there, valid, the ANN one as asked: a step run
    again (a cron tick, a retried `migrate index`) has nothing to build."""
    return (_as_asked(_ann_index(conn, slot, name), method, distance)
            and bool(catalog.index_valid(conn, slot.target.schema, slot.pending_index_name)))


def build_index(settings: Settings, target: Target, method: str | None = None,
                distance: str | None = None, m: int = 16, ef_construction: int = 64,
                lists: int | None = None, maintenance_work_mem: str = "512MB",
                parallel_workers: int | None = None,
                on_progress: Callable[[IndexBuild], None] | None = None) -> str:
    """CREATE INDEX CONCURRENTLY on the new column; an INVALID leftover is dropped first,
    a build in progress (another process's) is waited for (store.index_builds).

    Method and distance default to the live column's ANN index, so the app's queries
    (which use that index's operator) keep using an index after the swap; without
    one, HNSW for the target's configured `distance`. `on_progress` is called about twice
    a second with the build's phase and tuples/blocks done (pg_stat_progress_create_index).
    """
    with connect(settings.database_url, autocommit=True) as conn, ExitStack() as held:
        # Before anything long: the wait for a build in progress, DROP INDEX CONCURRENTLY
        # and ivfflat's count(*) outlast a role's statement_timeout as the build does.
        lift_statement_limits(conn)
        migration = require_open(conn, target, "filling")
        slots = slots_by_id(conn, target)
        slot = slots[migration.to_slot]
        refuse_if_clearing(conn, slot, "migrate index")
        method, distance = index_defaults(conn, slots[migration.from_slot], method, distance)
        name = ann_index_name(slot)
        if _built(conn, slot, name, method, distance):
            return name  # nothing to build: no build lock (nor a session of its own) needed
        # Another `migrate index`, `init` or side-fill step may be building it right now:
        # its INVALID index is then a build in progress, not a leftover to drop.
        held.enter_context(sole_builder(conn, target.schema, name))
        # The column's pending index, first: made only now, so that the fill's updates
        # could be HOT (store.setup.pending_index_at_setup); the swap counts the rows
        # still pending through it, under its lock.
        ensure_pending_index(conn, slot)
        existing = _ann_index(conn, slot, name)
        if _as_asked(existing, method, distance):
            return name
        if existing is not None:
            why = ("INVALID, left by an interrupted build" if not existing.valid else
                   f"{existing.method} for {existing.distance}, not {method} for {distance}")
            log.warning("dropping index %s (%s) to build it again", name, why)
            conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(
                sql.Identifier(target.schema, name)))
        if distance == "l1":
            server_versions.require(conn, server_versions.L1_INDEX, MigrationError)
        opclass = f"{slot.vector_type}_{distance}_ops"
        if method == "hnsw":
            params = sql.SQL("WITH (m = {}, ef_construction = {})").format(
                sql.Literal(m), sql.Literal(ef_construction))
        elif method == "ivfflat":
            rows_row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(slot.table)
                                    ).fetchone()
            rows = rows_row[0] if rows_row else 0
            chosen = lists or max(1, rows // 1000 if rows <= 1_000_000 else int(math.sqrt(rows)))
            params = sql.SQL("WITH (lists = {})").format(sql.Literal(chosen))
        else:
            raise MigrationError(f"index method must be hnsw or ivfflat, got {method!r}")
        prepare_build_session(conn, maintenance_work_mem, parallel_workers)
        create = sql.SQL(
            "CREATE INDEX CONCURRENTLY {name} ON {table} USING {method} ({column} {opclass})"
            " {params}").format(name=sql.Identifier(name), table=slot.table,
                                method=sql.SQL(method), column=slot.vector,
                                opclass=sql.Identifier(opclass), params=params)
        if on_progress is None:
            conn.execute(create)
        else:
            with BuildWatcher(settings.database_url, conn.info.backend_pid, on_progress):
                conn.execute(create)
        crash_point("index")
        return name


@dataclass(frozen=True)
class ColumnIndex:
    """An index on a slot's column: its method and the distance its opclass serves."""

    name: str
    valid: bool
    method: str
    distance: str | None  # opclass suffix (cosine, l2, ip, l1, ...); None if not a vector opclass


def column_indexes(conn: psycopg.Connection, slot: Slot) -> list[ColumnIndex]:
    """The indexes on the slot's column, except our pending index."""
    found = []
    for index in catalog.indexes(conn, catalog.regclass(conn, slot.table)):
        if slot.vector_column not in index.columns or index.name.startswith(
                "pgreembed_pending_"):
            continue
        found.append(ColumnIndex(index.name, index.valid, index.method,
                                 opclass_distance(index.opclass_of(slot.vector_column))))
    return found
