"""The app-side search helper on real services: no lock or transaction left behind on
the app's connection, and results ranked with the model live when its statement runs."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psycopg
import pytest
from psycopg import sql
from psycopg.pq import TransactionStatus

from pgreembed.config import Settings, load_settings
from pgreembed.migrations import swap
from pgreembed.operations.search import Hit, search
from pgreembed.store.pool import connect
from pgreembed.store.table_lock import LockPolicy
from pgreembed.testing.fake_openai import FakeOpenAIServer
from pgreembed.testing.fake_vectors import fake_vector
from tests.helpers import Stack, docs_config, seed, start_migration, wait_for, write_config

OLD_MODEL, NEW_MODEL, DIMS = "fake-384", "fake-alt-384", 384  # same size: a mix-up is silent
QUERY = "how do I compress a file?"
ROWS = 30


def settings_of(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The settings an app gets from its environment, as in docs/search.md."""
    for name in ("DATABASE_URL", "PGREEMBED_CONFIG", "OPENAI_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.setenv(name, stack.env[name])
    return load_settings()


def fill(stack: Stack, column: str, model: str) -> None:
    """Write what the workers would: `model`'s vector of each row's text."""
    with stack.connect() as conn:
        rows = conn.execute("SELECT id, concat_ws(E'\\n', title, body) FROM docs").fetchall()
        with conn.cursor() as cur:
            cur.executemany(
                sql.SQL("UPDATE docs SET {} = %s WHERE id = %s").format(sql.Identifier(column)),
                [(fake_vector(model, text, DIMS), key) for key, text in rows])


def initialised(stack: Stack, index: str = "hnsw (embedding vector_cosine_ops)") -> None:
    """Rows, `init`, the live column filled by OLD_MODEL and the app's index on it."""
    seed(stack, ROWS)
    init = stack.cli("init")
    assert init.returncode == 0, init.stderr
    fill(stack, "embedding", OLD_MODEL)
    with stack.connect() as conn:
        conn.execute(f"CREATE INDEX docs_embedding_idx ON docs USING {index}")


def ready_to_swap(stack: Stack) -> None:
    """A migration to NEW_MODEL (same dimensions) with its column filled and indexed."""
    initialised(stack)
    column = start_migration(stack, "--model", NEW_MODEL, "--dimensions", str(DIMS))
    fill(stack, column, NEW_MODEL)
    out = stack.cli("migrate", "index", "--target", "docs")
    assert out.returncode == 0, out.stderr


def assert_ranked_by(stack: Stack, hits: list[Hit], model: str, distance: str = "cosine",
                     limit: int = 5) -> None:
    """`hits` are the nearest rows to QUERY as `model` embeds both (exact distances)."""
    with stack.connect() as conn:
        rows = conn.execute("SELECT id, concat_ws(E'\\n', title, body) FROM docs").fetchall()
    query = fake_vector(model, QUERY, DIMS)
    vectors = np.stack([fake_vector(model, text, DIMS) for _, text in rows])
    if distance == "cosine":
        distances = 1.0 - vectors @ query  # unit vectors
    else:
        distances = np.linalg.norm(vectors - query, axis=1)
    order = np.argsort(distances)[:limit]
    assert [h.key for h in hits] == [rows[i][0] for i in order]
    np.testing.assert_allclose([h.distance for h in hits], distances[order], atol=1e-4)


def table_locks(stack: Stack, pid: int) -> list[str]:
    """Lock modes backend `pid` holds on the docs table."""
    with stack.connect() as conn:
        return sorted(str(r[0]) for r in conn.execute(
            "SELECT mode FROM pg_locks WHERE pid = %s AND relation = 'docs'::regclass"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            (pid,)))


def blocked_by(stack: Stack, pid: int) -> list[int]:
    """Backends waiting for a lock that backend `pid` holds."""
    with stack.connect() as conn:
        return [int(r[0]) for r in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))", (pid,))]


def swap_attempts(stdout: str) -> int:
    return int(json.loads(stdout)["attempts"])


@pytest.mark.parametrize("how", ["pgreembed.store.pool.connect", "psycopg.connect",
                                 "psycopg.connect autocommit"])
def test_idle_connection_is_left_idle_without_locks(stack: Stack, how: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Any connection the app has: ours, or plain psycopg (no pgvector adapters)."""
    initialised(stack)
    settings = settings_of(stack, monkeypatch)
    opened = (connect(settings.database_url) if how == "pgreembed.store.pool.connect" else
              psycopg.connect(settings.database_url, autocommit=how.endswith("autocommit")))
    with opened as conn:
        for _ in range(2):  # the second call must not find anything left by the first
            hits = search(conn, settings, "docs", QUERY, limit=5)
            assert_ranked_by(stack, hits, OLD_MODEL)
            assert conn.info.transaction_status == TransactionStatus.IDLE
            assert table_locks(stack, conn.info.backend_pid) == []


def test_readme_connection_does_not_block_a_swap(stack: Stack,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    ready_to_swap(stack)
    settings = settings_of(stack, monkeypatch)
    # The snippet of docs/search.md: a connection without autocommit, kept open by the app.
    with connect(settings.database_url) as conn:
        hits = search(conn, settings, "docs", QUERY, limit=5)
        assert_ranked_by(stack, hits, OLD_MODEL)
        assert conn.info.transaction_status == TransactionStatus.IDLE
        assert table_locks(stack, conn.info.backend_pid) == []
        started = time.monotonic()
        swap = stack.cli("migrate", "swap", "--target", "docs", "--json", timeout=300)
        elapsed = time.monotonic() - started
        assert swap.returncode == 0, swap.stderr
        assert swap_attempts(swap.stdout) == 1, swap.stderr  # no lock wait, no retry
        assert elapsed < 30, elapsed  # CLI start-up on a busy machine; blocked it took 67 s
        hits = search(conn, settings, "docs", QUERY, limit=5)
        assert_ranked_by(stack, hits, NEW_MODEL)
        assert conn.info.transaction_status == TransactionStatus.IDLE


@pytest.mark.parametrize("autocommit", [False, True])
def test_inside_the_apps_transaction(stack: Stack, autocommit: bool,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    initialised(stack)
    settings = settings_of(stack, monkeypatch)
    with connect(settings.database_url, autocommit=autocommit) as conn:
        with conn.transaction():
            conn.execute("INSERT INTO docs (title, body) VALUES ('app', 'its own write')")
            hits = search(conn, settings, "docs", QUERY, limit=5)
            assert_ranked_by(stack, hits, OLD_MODEL)
            assert conn.info.transaction_status == TransactionStatus.INTRANS
            # The app's INSERT and our SELECT: no lock beyond what statements take.
            assert table_locks(stack, conn.info.backend_pid) == [
                "AccessShareLock", "RowExclusiveLock"]
            conn.execute("SELECT 1")  # the app's transaction goes on
        assert conn.info.transaction_status == TransactionStatus.IDLE
        assert table_locks(stack, conn.info.backend_pid) == []
        assert conn.execute("SELECT count(*) FROM docs WHERE title = 'app'").fetchone() == (1,)


def test_swap_between_embedding_and_query(stack: Stack, fake_openai: FakeOpenAIServer,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    ready_to_swap(stack)
    settings = settings_of(stack, monkeypatch)
    fake_openai.set_faults(hold_marker=QUERY)
    with connect(settings.database_url) as conn, ThreadPoolExecutor(1) as pool:
        searching = pool.submit(search, conn, settings, "docs", QUERY, 5)
        wait_for(lambda: fake_openai.stats()["requests"] >= 1,
                 message="the query's embedding request (old model) to be held")
        swap = stack.cli("migrate", "swap", "--target", "docs", "--json", timeout=300)
        fake_openai.set_faults(hold_marker=None)
        hits = searching.result(timeout=60)
        assert swap.returncode == 0, swap.stderr
        assert swap_attempts(swap.stdout) == 1, swap.stderr
        assert_ranked_by(stack, hits, NEW_MODEL)
        assert fake_openai.stats()["text_counts"][QUERY] == 2  # old model, then new
        assert conn.info.transaction_status == TransactionStatus.IDLE


@pytest.mark.parametrize("isolation", ["read committed", "repeatable read"])
def test_swap_committed_while_the_query_waits_for_its_lock(
        stack: Stack, fake_openai: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch,
        isolation: str) -> None:
    """The statement queues behind the swap's exclusive lock and runs after its commit:
    it must resolve the column and read the registry as they are after the swap, also
    where transactions default to REPEATABLE READ (whose snapshot would predate it)."""
    ready_to_swap(stack)
    settings = settings_of(stack, monkeypatch)
    with stack.connect() as conn:
        conn.execute(sql.SQL("ALTER DATABASE {} SET default_transaction_isolation = {}").format(
            sql.Identifier(conn.info.dbname), sql.Literal(isolation)))
    # Holding the registry's rows stalls the swap inside its transaction, after the
    # renames, while it holds docs exclusively (it takes the migration's row before the
    # table, so holding that one would stall it before it holds anything).
    blocker = psycopg.connect(stack.dsn)
    blocker.execute("SELECT 1 FROM pgreembed.slots FOR UPDATE")
    blocker_pid = blocker.info.backend_pid
    fake_openai.set_faults(hold_marker=QUERY)
    with connect(settings.database_url) as conn, ThreadPoolExecutor(2) as pool:
        search_pid = conn.info.backend_pid
        searching = pool.submit(search, conn, settings, "docs", QUERY, 5)
        wait_for(lambda: fake_openai.stats()["requests"] >= 1,
                 message="the query's embedding request (old model) to be held")
        swapping = pool.submit(swap.swap, settings, settings.target("docs"),
                               policy=LockPolicy(lock_timeout_ms=60_000))
        swap_pid = wait_for(lambda: blocked_by(stack, blocker_pid),
                            message="the swap to stall inside its transaction")[0]
        fake_openai.set_faults(hold_marker=None)
        wait_for(lambda: search_pid in blocked_by(stack, swap_pid),
                 message="the search statement to wait for the swap's lock")
        blocker.rollback()
        blocker.close()
        assert swapping.result(timeout=60).attempts == 1
        hits = searching.result(timeout=60)
        assert_ranked_by(stack, hits, NEW_MODEL)
        assert fake_openai.stats()["text_counts"][QUERY] == 2  # old model, then new
        assert conn.info.transaction_status == TransactionStatus.IDLE


def _plans(notices: list[str]) -> list[dict[str, object]]:
    """auto_explain's JSON plans among the notices."""
    return [json.loads(n.split("plan:", 1)[1]) for n in notices if "plan:" in n]


def _nodes(plan: dict[str, object]) -> list[dict[str, object]]:
    found = [plan]
    for child in plan.get("Plans", []):  # type: ignore[attr-defined]
        found += _nodes(child)
    return found


@pytest.mark.parametrize("distance,index", [
    ("cosine", "hnsw (embedding vector_cosine_ops)"),
    ("l2", "ivfflat (embedding vector_l2_ops) WITH (lists = 1)"),
])
def test_search_uses_the_apps_index(stack: Stack, distance: str, index: str,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The statement's shape (registry check + lateral search) keeps the ANN index usable,
    and the operator is the target's distance."""
    write_config(stack.config_path, docs_config(target_extra=f'distance = "{distance}"'))
    initialised(stack, index)
    settings = settings_of(stack, monkeypatch)
    with connect(settings.database_url, autocommit=True) as conn:
        notices: list[str] = []
        conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        try:
            conn.execute("LOAD 'auto_explain'")
        except psycopg.errors.InsufficientPrivilege:
            pytest.skip("auto_explain needs a superuser")
        conn.execute("SET auto_explain.log_min_duration = 0")
        conn.execute("SET auto_explain.log_level = notice")
        conn.execute("SET auto_explain.log_format = json")
        conn.execute("SET enable_seqscan = off")  # as on a big table
        hits = search(conn, settings, "docs", QUERY, limit=5)
    assert_ranked_by(stack, hits, OLD_MODEL, distance)
    searches = [p for p in _plans(notices) if "pgreembed_registry" in str(p["Query Text"])]
    assert len(searches) == 1, notices
    scans = [n for n in _nodes(searches[0]["Plan"])  # type: ignore[arg-type]
             if n.get("Relation Name") == "docs"]
    assert [(n["Node Type"], n.get("Index Name")) for n in scans] == [
        ("Index Scan", "docs_embedding_idx")], scans
