"""`pgreembed init`: the bookkeeping in Postgres, created idempotently.

- schema `pgreembed` with the model and slot registries;
- per slot, a state table (model + content hash per row, recorded failures);
- on the app's table: the vector column if missing and a partial index over rows
  whose vector is NULL (so finding pending rows never scans the table; a migration's
  new column gets it at `migrate index`, see pending_index_at_setup); the triggers
  are `pgreembed.store.triggers`.
"""

from __future__ import annotations

import logging

import psycopg
from psycopg import sql

from pgreembed.config import Target
from pgreembed.config.model_keys import is_foreign, missing_provider_reason
from pgreembed.errors import SetupError
from pgreembed.store import catalog, server_versions
from pgreembed.store.blockers import SHARE_ROW_EXCLUSIVE
from pgreembed.store.index_builds import sole_builder
from pgreembed.store.privileges import lacking, required
from pgreembed.store.session import lift_statement_limits, statement_limits_lifted
from pgreembed.store.slots import (
    Slot,
    app_table,
    clear_misconfigured,
    load_slots,
    mark_misconfigured,
    primary_key_of,
    vector_type_for,
)
from pgreembed.store.table_lock import LockPolicy, run_locked
from pgreembed.store.triggers import drop_triggers, install_triggers, triggers_current
from pgreembed.store.versions import upgrade

log = logging.getLogger(__name__)


def check_server(conn: psycopg.Connection) -> bool:
    """pgvector on the server, and versions pgreembed runs on; whether the extension is
    enabled in this database. Checked before anything is changed (CREATE EXTENSION), so
    an unsupported server is said first, not after the user enabled the extension."""
    available = conn.execute(
        "SELECT installed_version IS NOT NULL FROM pg_available_extensions"
        " WHERE name = 'vector'"
    ).fetchone()
    if available is None:
        raise SetupError(
            "pgvector is not installed on this Postgres server: install the extension"
            " (package postgresql-<major>-pgvector, or build it from source) and retry"
        )
    server_versions.require_supported(conn)
    return bool(available[0])


def enable_pgvector(conn: psycopg.Connection) -> None:
    """CREATE EXTENSION vector, or say who may run it."""
    try:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    except psycopg.errors.InsufficientPrivilege:
        raise SetupError(
            "pgvector is available but not enabled, and this role may not enable it:"
            " run `CREATE EXTENSION vector` in this database as a superuser (pgvector is"
            " not a trusted extension; on managed Postgres, the admin role the service"
            " gives: rds_superuser, cloudsqlsuperuser, Azure's admin once vector is in"
            " azure.extensions, Supabase's postgres)"
        ) from None
    server_versions.require_supported(conn)  # the version just enabled


def check_rights(conn: psycopg.Connection, target: Target) -> None:
    """The minimal role's rights, checked before any DDL: one clear line with the
    statements to run (doctor's, word for word), not Postgres' "must be owner of table"
    halfway through."""
    rights = required(conn, app_table(target).as_string(conn))
    if rights.table_owner is None:
        return  # no such table: _check_table says so
    problem = lacking(conn, rights)
    if problem is not None:
        raise SetupError(f"target {target.name!r}: {problem}")


def ensure_model(conn: psycopg.Connection, target: Target) -> int:
    row = conn.execute(
        """
        INSERT INTO pgreembed.models (key, provider, name, dimensions) VALUES (%s, %s, %s, %s)
        ON CONFLICT (key) DO UPDATE SET key = excluded.key RETURNING id
        """,
        (target.model_key, target.provider, target.model, target.dimensions),
    ).fetchone()
    assert row is not None
    return int(row[0])


def _column_type(conn: psycopg.Connection, target: Target, column: str) -> str | None:
    found = catalog.column(
        conn, catalog.regclass(conn, app_table(target)), column)
    return None if found is None else found.formatted


def ensure_vector_column(conn: psycopg.Connection, target: Target, column: str,
                         dimensions: int, vector_type: str | None = None) -> bool:
    """Add the column if missing (True); refuse a column of another type or size."""
    wanted = f"{vector_type or vector_type_for(dimensions)}({dimensions})"
    found = _column_type(conn, target, column)
    if found is None:
        if wanted.startswith("halfvec"):
            server_versions.require(conn, server_versions.HALFVEC)
        conn.execute(sql.SQL("ALTER TABLE {} ADD COLUMN {} {}").format(
            app_table(target), sql.Identifier(column), sql.SQL(wanted)))
        log.info("added column %s %s to %s.%s", column, wanted, target.schema, target.table)
        return True
    if found != wanted and not found.startswith(("vector(", "halfvec(")):
        raise SetupError(
            f"target {target.name!r}: vector_column {column!r} is a {found} column, not a"
            f" pgvector one: name the column the vectors go in ({wanted}; `init` adds it"
            " if it does not exist)")
    if found != wanted:
        raise SetupError(
            f"target {target.name!r}: column {column!r} is {found}, expected {wanted}"
            f" for {target.model_key} (a model or storage change is a migration:"
            " `pgreembed migrate`)")
    return False


def _check_table(conn: psycopg.Connection, target: Target) -> None:
    exists = conn.execute(
        "SELECT to_regclass(%s)", (app_table(target).as_string(conn),)
    ).fetchone()
    if exists is None or exists[0] is None:
        raise SetupError(f"target {target.name!r}: table {target.schema}.{target.table}"
                         " does not exist")
    for column in target.text_columns:
        if _column_type(conn, target, column) is None:
            raise SetupError(f"target {target.name!r}: text column {column!r} does not exist"
                             f" in {target.schema}.{target.table}")


def register_live_slot(conn: psycopg.Connection, target: Target) -> Slot:
    """The target's live slot, created on first init and kept in step with the config."""
    model_id = ensure_model(conn, target)
    pk, pk_type = primary_key_of(conn, target)
    live = [s for s in load_slots(conn, target) if s.role == "live"]
    migrated = conn.execute("SELECT count(*) FROM pgreembed.migrations WHERE target = %s",
                            (target.name,)).fetchone()
    if live and live[0].model_id != model_id and migrated and migrated[0]:
        # After a migration the registry, not the config, says which model is live.
        now = live[0]
        log.warning("target %s: the config says %s but a migration made %s live; set"
                    " provider = %r, model = %r, dimensions = %d, vector_column = %r in its"
                    " [[target]] (init keeps the registry's model meanwhile)", target.name,
                    target.model_key, now.model_key, now.provider, now.model, now.dimensions,
                    now.vector_column)
        return live[0]
    if live and target.vector_type and live[0].vector_type != target.vector_type:
        # The storage type is the registry's (a derived migration changes it), like the model.
        now = live[0]
        if migrated and migrated[0]:
            log.warning("target %s: the config says vector_type = %r but the live column is"
                        " %s after a migration; set vector_type = %r in its [[target]] (init"
                        " keeps the registry's)", target.name, target.vector_type,
                        now.column_type, now.vector_type)
        else:
            fix = (f"`pgreembed migrate start --target {target.name} --derive halfvec` makes"
                   " it without a provider call" if target.vector_type == "halfvec"
                   else "a storage change is a migration")
            raise SetupError(f"target {target.name!r}: the live column is {now.column_type},"
                             f" the config says vector_type = {target.vector_type!r}: {fix}")
    if not live:
        conn.execute(
            """
            INSERT INTO pgreembed.slots (target, schema_name, table_name, vector_column,
                                         primary_key, pk_type, role, model_id, vector_type)
            VALUES (%s, %s, %s, %s, %s, %s, 'live', %s, %s)
            """,
            (target.name, target.schema, target.table, target.vector_column, pk, pk_type,
             model_id, target.storage_type),
        )
    elif live[0].model_id != model_id and live[0].dimensions != target.dimensions:
        raise SetupError(
            f"target {target.name!r}: the live column holds {live[0].model_key}; changing to"
            f" {target.model_key} changes dimensions, which is a migration:"
            f" `pgreembed migrate start --target {target.name} --model {target.model}"
            f" --dimensions {target.dimensions}`")
    elif live[0].model_id != model_id:
        # Same column, other model of the same size: rows become "outdated" and are
        # re-embedded in place. Other sizes were refused by ensure_vector_column.
        log.warning("target %s: model changed to %s; rows will be re-embedded in place",
                    target.name, target.model_key)
        conn.execute("UPDATE pgreembed.slots SET model_id = %s WHERE id = %s",
                     (model_id, live[0].id))
    return next(s for s in load_slots(conn, target) if s.role == "live")


def create_state_table(conn: psycopg.Connection, slot: Slot) -> None:
    conn.execute(sql.SQL(
        """
        CREATE TABLE IF NOT EXISTS {state} (
            pgr_pk {pk_type} PRIMARY KEY,
            pgr_model_id integer,
            pgr_hash uuid,
            pgr_embedded_at timestamptz,
            pgr_truncated boolean NOT NULL DEFAULT false,
            pgr_failed_hash uuid,
            pgr_failure text,
            pgr_attempts integer NOT NULL DEFAULT 0,
            pgr_failed_at timestamptz
        )
        """).format(state=slot.state_table, pk_type=slot.pk_cast))
    conn.execute(sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (pgr_model_id, pgr_pk)").format(
        sql.Identifier(f"slot_{slot.id}_model"), slot.state_table))
    # Rows already embedded from a text, per model (pgreembed.embedding.reuse).
    conn.execute(sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (pgr_model_id, pgr_hash)").format(
        sql.Identifier(f"slot_{slot.id}_hash"), slot.state_table))
    conn.execute(sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (pgr_pk)"
                         " WHERE pgr_failed_hash IS NOT NULL").format(
        sql.Identifier(f"slot_{slot.id}_failed"), slot.state_table))


def adopt_existing_vectors(conn: psycopg.Connection, slot: Slot) -> int:
    """Rows that already have a vector are taken as embedded by the configured model."""
    cur = conn.execute(sql.SQL(
        """
        INSERT INTO {state} (pgr_pk, pgr_model_id, pgr_hash, pgr_embedded_at)
        SELECT {pk}, %s, {hash}, now() FROM {table} WHERE {vector} IS NOT NULL
        ON CONFLICT (pgr_pk) DO NOTHING
        """).format(state=slot.state_table, pk=slot.pk, hash=slot.hash_expr, table=slot.table,
                    vector=slot.vector), (slot.model_id,))
    return cur.rowcount


def pending_index_at_setup(slot: Slot) -> bool:
    """Whether `init` and `migrate start` make the slot's pending index. Not for a
    migration's new column ('next'): an index whose predicate names the column rules out
    HOT for every write into it, so each fill update would file the row's unchanged live
    vector again in the live HNSW index (a graph search per row: bench.migration_space).
    Its pending rows are found by a key-order walk meanwhile (store.pending); `migrate
    index` makes the index, before the ANN index, for the swap and the column's life after."""
    return slot.role != "next"


def ensure_pending_index(dsn_conn: psycopg.Connection, slot: Slot) -> None:
    """Partial index of rows without a vector, built CONCURRENTLY (writes go on).

    Needs an autocommit connection; its statement limits are lifted for the build (long by
    nature) and put back after, so the caller's later statements keep the DBA's timeout.
    A failed concurrent build leaves an INVALID index behind; it is dropped and rebuilt. A
    build in progress (another `init`, a `migrate start`) is waited for, not dropped
    (index_builds).
    """
    name = slot.pending_index_name
    if catalog.index_valid(dsn_conn, slot.target.schema, name):
        return
    with statement_limits_lifted(dsn_conn), sole_builder(dsn_conn, slot.target.schema, name):
        valid = catalog.index_valid(dsn_conn, slot.target.schema, name)
        if valid:
            return
        if valid is not None:
            log.warning("dropping INVALID index %s left by an interrupted build", name)
            dsn_conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(
                sql.Identifier(slot.target.schema, name)))
        dsn_conn.execute(sql.SQL(
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON {table} ({pk})"
            " WHERE {vector} IS NULL").format(name=sql.Identifier(name), table=slot.table,
                                              pk=slot.pk, vector=slot.vector))


def init_target(dsn: str, target: Target, policy: LockPolicy | None = None, *,
                adopt: bool = False) -> Slot:
    """Create or update everything a target needs. Safe to run again at any time.

    It runs at every scheduler start (and in init containers), so its DDL on the app's
    table goes through table_lock (short lock attempts, retried, blockers named), and
    triggers that are already as wanted are left alone (no lock at all). `adopt`: a chunk
    table filled by pgai is taken as it is (store.chunk_setup.init_chunking).
    """
    from pgreembed.store.pool import connect

    with connect(dsn, vector=False) as conn:
        enabled = check_server(conn)
        check_rights(conn, target)
        if not enabled:  # a change: after every check that could refuse the target
            enable_pgvector(conn)
        conn.commit()
    if target.parent is not None:  # chunked: the chunk table is the target's table
        from pgreembed.store.chunk_setup import init_chunking
        init_chunking(dsn, target, policy, check_rights, adopt=adopt)
    table = app_table(target)
    # Mostly trigger changes (SHARE ROW EXCLUSIVE); ADD COLUMN only on the first init.
    slot, slots, adopted = run_locked(dsn, table, "init",
                                      lambda conn: _init_in_transaction(conn, target), policy,
                                      mode=SHARE_ROW_EXCLUSIVE)
    if adopted:
        log.info("target %s: %d existing vectors adopted as %s", target.name, adopted,
                 target.model_key)
    with connect(dsn, autocommit=True, vector=False) as conn:
        lift_statement_limits(conn)  # ANALYZE of a big table outlasts a role's timeout
        for each in slots:
            # A new column's pending index once `migrate index` began it: an INVALID one
            # (an interrupted build) is rebuilt, as doctor says `init` does.
            if pending_index_at_setup(each) or catalog.index_valid(
                    conn, each.target.schema, each.pending_index_name) is not None:
                ensure_pending_index(conn, each)
            # Without statistics (a column just added) the planner guesses 0.5% NULL vectors
            # and hashes the whole backlog for every page of pending keys (100x slower at 80k).
            conn.execute(sql.SQL("ANALYZE {} ({})").format(each.table, each.vector))
    return slot


def _init_in_transaction(conn: psycopg.Connection, target: Target
                         ) -> tuple[Slot, list[Slot], int]:
    # One initialiser at a time (two pods starting together must not race the DDL).
    upgrade(conn)
    _check_table(conn, target)
    registered = [s for s in load_slots(conn, target) if s.role == "live"]
    dimensions = registered[0].dimensions if registered else target.dimensions
    kind = registered[0].vector_type if registered else target.storage_type
    added = ensure_vector_column(conn, target, target.vector_column, dimensions, kind)
    first_init = not registered
    slot = register_live_slot(conn, target)
    foreign = [s for s in load_slots(conn, target) if is_foreign(s.provider)]
    if clear_misconfigured(conn, target) > len(foreign):
        log.warning("target %s: cleared the misconfigured mark; its batches are dispatched"
                    " again", target.name)
    for each in foreign:  # adopted from pgai with a provider pgreembed lacks: frozen
        mark_misconfigured(conn, each, missing_provider_reason(each.provider, each.model))
    slots = load_slots(conn, target)
    for each in slots:
        create_state_table(conn, each)
    # Once, when the target is first set up (later inits must not scan the table), and
    # only if the column was there before (a column added just now holds no vector).
    adopted = adopt_existing_vectors(conn, slot) if first_init and not added else 0
    if not target.trigger:
        drop_triggers(conn, target)
    elif not triggers_current(conn, target, slots):
        install_triggers(conn, target, slots)
    return slot, slots, adopted
