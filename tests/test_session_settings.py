"""The session settings pgreembed pins (store.session), against the defaults a DBA or a
managed service sets per database: isolation, timeouts, search_path."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psycopg
import pytest
from pgvector.psycopg import register_vector
from psycopg import sql

from pgreembed.config import KEPT_MEMORY_MB, load_settings
from pgreembed.store import catalog
from pgreembed.store.pool import close_pools, connect, get_pool
from pgreembed.store.rows import lock_slot
from pgreembed.store.session import keep_freed_memory
from pgreembed.store.setup import ensure_pending_index
from pgreembed.store.slots import Slot, app_table, load_slots
from pgreembed.store.table_lock import hold_writers_out
from tests.helpers import (
    OrdinaryRoles,
    Stack,
    end_transaction_after,
    json_document,
    migrate,
    seed,
    wait_for,
)


def set_database_default(stack: Stack, setting: str, value: str) -> None:
    """ALTER DATABASE ... SET: the sessions opened from now on get it."""
    with psycopg.connect(stack.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER DATABASE {} SET {} = {}").format(
            sql.Identifier(conn.info.dbname), sql.Identifier(setting), sql.Literal(value)))


@contextlib.contextmanager
def pooled(stack: Stack) -> Iterator[psycopg.Connection]:
    """A connection of the workers' pool (closed with the pool at the end)."""
    try:
        with get_pool(stack.dsn).connection() as conn:
            yield conn
    finally:
        close_pools()


@pytest.mark.parametrize("isolation", ["repeatable read", "serializable"])
@pytest.mark.second_server
def test_a_write_that_waited_on_a_swap_reads_the_registry_the_swap_left(
        stack: Stack, isolation: str) -> None:
    """The worker's write waits on the writers' lock while a swap renames the columns and
    updates the registry; once through, it must see the column where the swap left its
    slot. Under a database default of REPEATABLE READ its snapshot dates from before the
    wait, so it would write this model's vectors into the other model's column."""
    seed(stack, 5)
    assert stack.cli("init").returncode == 0
    set_database_default(stack, "default_transaction_isolation", isolation)
    target = load_settings(stack.config_path, stack.env).target("docs")
    found: list[Slot | None] = []
    with connect(stack.dsn) as swap, pooled(stack) as writer:
        live = swap.execute("SELECT id FROM pgreembed.slots WHERE role = 'live'").fetchone()
        assert live is not None
        hold_writers_out(swap, app_table(target), 100)

        def write() -> None:
            found.append(lock_slot(writer, target, live[0], "ROW EXCLUSIVE"))
            writer.rollback()

        thread = threading.Thread(target=write, daemon=True)
        thread.start()
        wait_for(lambda: swap.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        ).fetchone() == (1,), message="the write waits on the swap")
        swap.execute("ALTER TABLE docs RENAME COLUMN embedding TO embedding_swapped")
        swap.execute("UPDATE pgreembed.slots SET vector_column = 'embedding_swapped'"
                     " WHERE id = %s", live)
        swap.commit()
        thread.join(10)
    assert found and found[0] is not None
    assert found[0].vector_column == "embedding_swapped"


def test_every_connection_pins_read_committed_and_its_own_timeouts(stack: Stack) -> None:
    set_database_default(stack, "default_transaction_isolation", "serializable")
    set_database_default(stack, "idle_session_timeout", "2s")
    shown = "SELECT current_setting('transaction_isolation'),"\
            " current_setting('idle_in_transaction_session_timeout'),"\
            " current_setting('idle_session_timeout')"
    with connect(stack.dsn, autocommit=True) as auto, connect(stack.dsn) as direct, \
            pooled(stack) as pool:
        for conn in (auto, direct, pool):
            assert conn.execute(shown).fetchone() == ("read committed", "1min", "0")
            if not conn.autocommit:
                conn.rollback()
    set_database_default(stack, "idle_in_transaction_session_timeout", "5s")
    with connect(stack.dsn) as stricter:  # a stricter limit of the DBA's is kept
        assert stricter.execute(shown).fetchone() == ("read committed", "5s", "0")


def test_the_clear_trigger_works_when_pgvector_is_off_the_apps_search_path(
        stack: Stack) -> None:
    """pgvector in a schema of its own (Supabase: `extensions`), named by pgreembed's
    search_path but not by the app's: the app's text edits must still clear the vector."""
    with psycopg.connect(stack.dsn, autocommit=True) as admin:
        admin.execute("DROP EXTENSION vector")
        admin.execute("CREATE SCHEMA extensions")
        admin.execute("CREATE EXTENSION vector SCHEMA extensions")
    with psycopg.connect(stack.dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("ALTER DATABASE {} SET search_path = public, extensions"
                              ).format(sql.Identifier(admin.info.dbname)))
    seed(stack, 3)
    init = stack.cli("init")
    assert init.returncode == 0, init.stderr
    with psycopg.connect(stack.dsn, autocommit=True) as app:
        app.execute("UPDATE docs SET embedding = array_fill(0.5, ARRAY[384])::real[]::"
                    "extensions.vector")
        app.execute("SET search_path = public")
        app.execute("UPDATE docs SET body = 'edited' WHERE id = 1")
        assert app.execute("SELECT id FROM docs WHERE embedding IS NULL").fetchall() == [(1,)]
        app.execute("UPDATE docs SET views = 1")  # not a text change: vectors stay
        assert app.execute("SELECT count(*) FROM docs WHERE embedding IS NULL"
                           ).fetchone() == (1,)


def test_an_index_build_outlasts_the_databases_statement_timeout(stack: Stack) -> None:
    """A database (or role) statement_timeout of 1 s; the build waits 2.5 s for an app
    transaction that writes the table (CREATE INDEX CONCURRENTLY waits for writers), as a
    big table's build takes minutes: it must finish, not be cancelled. So must the DROP
    INDEX CONCURRENTLY of an index of the wrong kind before it (it waits for them too)."""
    seed(stack, 20)
    assert stack.cli("init").returncode == 0
    migrate(stack, "start", "--model", "fake-alt-384", "--dimensions", "384")
    with psycopg.connect(stack.dsn, autocommit=True) as conn:  # not the index asked for:
        slot_id, column = conn.execute(  # `migrate index` drops it (CONCURRENTLY) first
            "SELECT id, vector_column FROM pgreembed.slots WHERE role = 'next'").fetchone()
        conn.execute(sql.SQL("CREATE INDEX {} ON docs USING ivfflat ({} vector_cosine_ops)"
                             " WITH (lists = 1)").format(
            sql.Identifier(f"pgreembed_ann_{slot_id}"), sql.Identifier(column)))
    set_database_default(stack, "statement_timeout", "1s")
    app = psycopg.connect(stack.dsn)
    app.execute("UPDATE docs SET views = views + 1 WHERE id = 1")
    timer = end_transaction_after(app, 2.5, commit=True)
    try:
        built = stack.cli("migrate", "index", "--target", "docs")
    finally:
        timer.join()
        app.close()
    assert built.returncode == 0, built.stderr[-2000:]
    status = json_document(stack.cli("migrate", "status", "--target", "docs", "--json").stdout)
    assert status  # the migration is still there, its index built
    with psycopg.connect(stack.dsn) as conn:
        assert conn.execute("SELECT count(*) FROM pg_index WHERE indrelid = 'docs'::regclass"
                            " AND indisvalid AND indexrelid::regclass::text LIKE"
                            " 'pgreembed_ann_%'").fetchone() == (1,)


def test_the_pending_index_build_leaves_the_callers_statement_timeout_alone(
        stack: Stack) -> None:
    """A side fill builds its pending index on the connection it then copies pages with:
    those copies must keep the DBA's statement_timeout, lifted for the build only."""
    seed(stack, 3)
    assert stack.cli("init").returncode == 0
    target = load_settings(stack.config_path, stack.env).target("docs")
    with connect(stack.dsn, autocommit=True) as conn:
        slot = load_slots(conn, target)[0]
        conn.execute(sql.SQL("DROP INDEX {}").format(
            sql.Identifier(target.schema, slot.pending_index_name)))
        conn.execute("SET statement_timeout = '7s'")
        ensure_pending_index(conn, slot)
        assert catalog.index_valid(conn, target.schema, slot.pending_index_name)
        assert conn.execute("SELECT current_setting('statement_timeout')").fetchone() == (
            "7s",)


def _page_faults(pid: int) -> int:
    """The minor page faults of one server process so far (/proc)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


def _faults_per_hnsw_statement(conn: psycopg.Connection, vectors: list[np.ndarray]) -> float:
    """Minor page faults of `conn`'s backend per 6-row UPDATE through the HNSW index, each
    its own transaction (a worker's write slice), after two to warm up."""
    row = conn.execute("SELECT pg_backend_pid(), current_database()").fetchone()
    conn.rollback()
    assert row is not None
    command = Path(f"/proc/{row[0]}/cmdline")
    # A server in a container or on another host: its pids are not this machine's.
    if not command.exists() or row[1].encode() not in command.read_bytes():
        pytest.skip("the server's backend is not a process of this machine")

    def write(first: int) -> None:
        with conn.transaction():
            conn.execute("UPDATE docs d SET embedding = i.vec FROM unnest(%s::bigint[],"
                         " %s::vector[]) AS i(id, vec) WHERE d.id = i.id",
                         (list(range(first, first + 6)), vectors[first:first + 6]))

    write(1)
    write(7)
    before = _page_faults(row[0])
    for first in range(13, 73, 6):
        write(first)
    return (_page_faults(row[0]) - before) / 10


def test_pooled_sessions_keep_their_freed_memory_for_small_hnsw_writes(
        ordinary_roles: tuple[Stack, OrdinaryRoles]) -> None:
    """A write slice through HNSW is a statement of a few rows; its graph search allocates
    a few MB that glibc's malloc used to give back to the OS at the statement's end, so
    each slice faulted them in again (~1,600 page faults, bench.hnsw_statement_cost). The
    workers' pool raises the allocator's thresholds once a session (store.session
    .keep_freed_memory, `[worker] kept_memory_mb`); with the setting at 0 (the control)
    the statements still fault."""
    stack, roles = ordinary_roles
    set_database_default(stack, "default_transaction_isolation", "repeatable read")
    rng = np.random.default_rng(7)
    vectors = [rng.standard_normal(1536).astype(np.float32) for _ in range(300)]
    with psycopg.connect(stack.dsn, autocommit=True) as conn:
        register_vector(conn)
        conn.execute("ALTER TABLE docs ADD COLUMN embedding vector(1536)")
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO docs (id, body, embedding) VALUES (%s, 'x', %s)",
                            [(pk, vectors[pk - 1]) for pk in range(1, 301)])
        conn.execute("CREATE INDEX ON docs USING hnsw (embedding vector_cosine_ops)")
    faults = {}
    for kept_memory_mb in (0, KEPT_MEMORY_MB):
        try:
            with get_pool(roles.pgreembed_dsn, kept_memory_mb=kept_memory_mb
                          ).connection() as conn:
                faults[kept_memory_mb] = _faults_per_hnsw_statement(conn, vectors)
        finally:
            close_pools()
    if faults[0] < 500:  # musl, jemalloc, or MALLOC_*_THRESHOLD_ set: nothing to keep
        pytest.skip(f"this server's allocator gives no memory back to fault in: {faults}")
    assert faults[KEPT_MEMORY_MB] < 150, faults


def test_keeping_freed_memory_is_best_effort(stack: Stack, caplog: pytest.LogCaptureFixture
                                             ) -> None:
    """A role's tiny statement_timeout cancels the 16 MB statement: the session goes on
    without it (one warning), it is not a connection the pool must throw away."""
    with psycopg.connect(stack.dsn, options="-c statement_timeout=1") as conn:
        keep_freed_memory(conn, KEPT_MEMORY_MB)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert "could not set this session up to keep its freed memory" in caplog.text
    with psycopg.connect(stack.dsn) as conn, pytest.raises(ValueError, match="0 to 31 MB"):
        keep_freed_memory(conn, 32)
