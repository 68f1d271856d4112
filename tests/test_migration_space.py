"""A finished migration gives the replaced vectors' space back to the table (issue 24).

DROP COLUMN alone frees nothing: every replaced (TOASTed) vector stayed on disk until its
row was rewritten, so after one migration the table held both models' vectors (live
data 1.93x, bench.migration_space). finalize now clears the old column first
(migrations.clear), while the app writes and holds some rows locked; `migrate plan`
predicts the table's size at the peak and after finalize.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
from typing import Any

import psycopg
import pytest

from pgreembed.errors import ConfigError
from pgreembed.migrations.crash_point import CRASH_AT
from pgreembed.migrations.disk import parse_size
from pgreembed.store import server_versions
from tests.app_side import (
    assert_app_reads_live,
    create_app_objects,
    repeatable_read_by_default,
)
from tests.helpers import (
    ROOT,
    OrdinaryRoles,
    Stack,
    assert_column_current,
    docs_config,
    end_transaction_after,
    in_background,
    json_document,
    migrate,
    require_server,
    seed,
    start_migration,
    wait_filled,
    wait_for,
    write_config,
)

OLD, NEW, DIMS = "fake-768", "fake-alt-768", 768  # 3,080 bytes a vector: TOASTed
ROWS = 2000


def sizes(stack: Stack) -> dict[str, int]:
    """The docs table after a plain VACUUM: on disk (heap + TOAST + indexes) and its live
    data (pgstattuple's live tuple bytes of heap and TOAST)."""
    with psycopg.connect(stack.dsn, autocommit=True) as conn:
        conn.execute("VACUUM docs")
        row = conn.execute(
            "SELECT pg_total_relation_size('docs'), (SELECT tuple_len FROM pgstattuple('docs'))"
            " + (SELECT tuple_len FROM pgstattuple(reltoastrelid)) FROM pg_class"
            " WHERE oid = 'docs'::regclass").fetchone()
    assert row is not None
    return {"disk": int(row[0]), "data": int(row[1])}


def editing(stack: Stack, per_second: float = 50.0, rows: int = ROWS):  # type: ignore[no-untyped-def]
    """The app: edits the text of a random row of the first `rows`, `per_second` times a
    second."""
    def run(stop: threading.Event) -> None:
        rng = random.Random(24)
        with psycopg.connect(stack.dsn, autocommit=True) as conn:
            while not stop.wait(1.0 / per_second):
                conn.execute("UPDATE docs SET body = %s WHERE id = %s",
                             (f"edited {rng.random()}", rng.randint(1, rows)))
    return in_background(run)


def nulls(stack: Stack, column: str) -> int:
    with stack.connect() as conn:
        row = conn.execute(f"SELECT count(*) FROM docs WHERE {column} IS NULL").fetchone()
    return int(row[0]) if row else -1


def holding_rows(stack: Stack, seconds: float) -> psycopg.Connection:
    """An app transaction holding rows 1-20 locked (FOR UPDATE) for `seconds`."""
    app = psycopg.connect(stack.dsn)
    app.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")  # as apps on RR do to lock
    app.execute("SELECT id FROM docs WHERE id <= 20 FOR UPDATE").fetchall()
    end_transaction_after(app, seconds)
    return app


@pytest.mark.second_server
def test_finalize_gives_the_replaced_vectors_space_back(stack: Stack) -> None:
    write_config(stack.config_path, docs_config(batch_size=100, max_inflight_rows=400).replace(
        '"fake-384"', f'"{OLD}"').replace("dimensions = 384", f"dimensions = {DIMS}"))
    with stack.connect() as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pgstattuple")
    seed(stack, ROWS)
    assert stack.cli("init").returncode == 0
    stack.start_worker(threads=4)
    stack.start_scheduler()
    wait_filled(stack, "embedding")
    before = sizes(stack)
    planned = json.loads(migrate(stack, "plan", "--model", NEW, "--dimensions", str(DIMS),
                                 "--json"))["disk"]
    refused = stack.cli("migrate", "plan", "--target", "docs", "--model", NEW,
                        "--dimensions", str(DIMS), "--disk-budget",
                        str(planned["peak_extra_bytes"] // 2))
    assert refused.returncode == 4, refused.stdout + refused.stderr
    measured: dict[str, Any] = {}
    with editing(stack):
        column = start_migration(stack, "--model", NEW, "--dimensions", str(DIMS))
        wait_for(lambda: nulls(stack, column) <= 100, timeout=120,
                 message=f"{column} filled but for the rows being edited")
        migrate(stack, "swap")  # waits for the rest
        measured["peak"] = sizes(stack)
        app = holding_rows(stack, 2.0)  # finalize clears around them, then takes them
        migrate(stack, "finalize")
        app.close()
    after = sizes(stack)
    print(json.dumps({"before": before, "peak": measured["peak"], "after": after,
                      "planned": planned}))
    # The replaced vectors left: the table's data is back to its size before.
    assert after["data"] <= 1.1 * before["data"], (before, after)
    with stack.connect() as conn:
        assert conn.execute("SELECT count(*) FROM pgreembed.slots WHERE role = 'old'"
                            ).fetchone() == (0,)
    # The plan's disk figures, within 20% of what was measured.
    for planned_bytes, got in ((planned["peak_bytes"], measured["peak"]["disk"]),
                               (planned["after_finalize_bytes"], after["disk"])):
        assert abs(planned_bytes - got) <= 0.2 * got, (planned, measured, after)
    wait_filled(stack, "embedding")
    assert_column_current(stack, "embedding", NEW, DIMS)


def cli(stack: Stack, *args: str, crash_at: str | None = None
        ) -> subprocess.CompletedProcess[str]:
    """The CLI; with `crash_at`, it SIGKILLs itself right after that point's commit."""
    env = {**stack.env, **({CRASH_AT: crash_at} if crash_at else {})}
    return subprocess.run([sys.executable, "-m", "pgreembed", *args, "--target", "docs"],
                          env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)


def old_vectors(stack: Stack, column: str) -> int:
    return ROWS_SMALL - nulls(stack, column)


ROWS_SMALL = 60


@pytest.mark.second_server
def test_finalize_killed_while_clearing_resumes_and_refuses_rollback(
        ordinary_roles: tuple[Stack, OrdinaryRoles]) -> None:
    """As an ordinary role, REPEATABLE READ by default, an app view and function on the
    vector column."""
    stack, roles = ordinary_roles
    repeatable_read_by_default(stack)
    seed(stack, ROWS_SMALL)
    assert stack.cli("init").returncode == 0
    create_app_objects(stack, roles)
    with stack.connect() as conn:
        conn.execute("CREATE INDEX docs_embedding_idx ON docs USING hnsw"
                     " (embedding vector_cosine_ops)")
    stack.start_worker(threads=2)
    stack.start_scheduler()
    wait_filled(stack, "embedding")
    column = start_migration(stack, "--model", "fake-alt-384", "--dimensions", "384")
    wait_filled(stack, column)
    migrate(stack, "index")
    migrate(stack, "swap")
    # Killed once the old column is marked: nothing cleared yet, but no way back.
    killed = cli(stack, "migrate", "finalize", crash_at="finalize_begun")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    refused = cli(stack, "migrate", "rollback")
    assert refused.returncode == 4 and "finalize has begun clearing" in refused.stderr
    # Killed after clearing: every old vector gone, its indexes too, the column still there.
    killed = cli(stack, "migrate", "finalize", crash_at="finalize_cleared")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert old_vectors(stack, column) == 0
    with stack.connect() as conn:
        assert conn.execute("SELECT count(*) FROM pg_indexes WHERE tablename = 'docs'"
                            " AND indexdef LIKE %s", (f"%{column}%",)).fetchone() == (0,)
    done = cli(stack, "migrate", "finalize")
    assert done.returncode == 0, done.stderr[-2000:]
    with stack.connect() as conn:
        assert conn.execute("SELECT phase FROM pgreembed.migrations").fetchall() == [
            ("finalized",)]
        conn.execute("UPDATE docs SET body = 'after finalize' WHERE id = 5")
    wait_filled(stack, "embedding")
    assert_column_current(stack, "embedding", "fake-alt-384", 384)
    assert_app_reads_live(roles)


def app_editing(dsn: str, per_second: float = 50.0):  # type: ignore[no-untyped-def]
    """The app, as its own role: edits the text of a random row, `per_second` times a
    second."""
    def run(stop: threading.Event) -> None:
        rng = random.Random(25)
        with psycopg.connect(dsn, autocommit=True) as conn:
            while not stop.wait(1.0 / per_second):
                try:
                    conn.execute("UPDATE docs SET body = %s WHERE id = %s",
                                 (f"edited {rng.random()}", rng.randint(1, ROWS)))
                except psycopg.errors.SerializationFailure:
                    continue  # REPEATABLE READ: the app retries another edit
    return in_background(run)


@pytest.mark.second_server
def test_compact_gives_the_freed_space_back_to_the_os(
        ordinary_roles: tuple[Stack, OrdinaryRoles]) -> None:
    """After finalize the freed space is at the front of the TOAST file and the live
    vectors at its end: a plain VACUUM returns nothing (2.1x here). `migrate compact`
    stores the tail's vectors again in the front, then VACUUM truncates the tail. As an
    ordinary role, REPEATABLE READ by default, the app's view and function, the app
    editing 50 rows/s and holding rows while it runs."""
    stack, roles = ordinary_roles
    require_server(stack.dsn, server_versions.COMPACT)
    write_config(stack.config_path, docs_config(batch_size=100, max_inflight_rows=400).replace(
        '"fake-384"', f'"{OLD}"').replace("dimensions = 384", f"dimensions = {DIMS}"))
    repeatable_read_by_default(stack)
    with stack.connect() as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pgstattuple")
    seed(stack, ROWS)
    assert stack.cli("init").returncode == 0
    create_app_objects(stack, roles)
    stack.start_worker(threads=4)
    stack.start_scheduler()
    wait_filled(stack, "embedding")
    before = sizes(stack)
    with app_editing(roles.app_dsn):
        column = start_migration(stack, "--model", NEW, "--dimensions", str(DIMS))
        wait_for(lambda: nulls(stack, column) <= 100, timeout=120,
                 message=f"{column} filled but for the rows being edited")
        migrate(stack, "swap")
        migrate(stack, "finalize")
        finalized = sizes(stack)
        with stack.connect() as conn:  # an app's DO ALSO rule refuses an UPDATE with WITH
            conn.execute("CREATE TABLE vector_log (id bigint, embedding vector);"
                         " CREATE RULE log_vectors AS ON UPDATE TO docs DO ALSO"
                         " INSERT INTO vector_log VALUES (NEW.id, NEW.embedding);"
                         " GRANT INSERT ON vector_log TO PUBLIC")
        app = holding_rows(stack, 2.0)  # compact moves around them, then takes them
        compacted = stack.cli("migrate", "compact", "--target", "docs", "--json",
                              timeout=300)
        app.close()
    assert compacted.returncode == 0, compacted.stdout + compacted.stderr
    doc = json_document(compacted.stdout)
    after = sizes(stack)
    print(json.dumps({"before": before, "finalized": finalized, "after": after,
                      "compact": doc}))
    # What finalize leaves: the data is back to its size, the file is not (the tail).
    assert finalized["data"] <= 1.1 * before["data"], (before, finalized)
    assert finalized["disk"] > 1.5 * before["disk"], (before, finalized)
    # compact: the file too, within 10%.
    assert after["disk"] <= 1.1 * before["disk"], (before, finalized, after, doc)
    assert doc["moved"] >= ROWS // 2 and doc["held"] == 0 and not doc["stopped_full"], doc
    assert doc["table_bytes_after"] <= 1.1 * before["disk"], doc
    wait_filled(stack, "embedding")
    assert_column_current(stack, "embedding", NEW, DIMS)
    assert_app_reads_live(roles)
    refused = stack.cli("migrate", "start", "--target", "docs", "--model", OLD,
                        "--dimensions", str(DIMS))
    assert refused.returncode == 0, refused.stderr[-2000:]
    during = stack.cli("migrate", "compact", "--target", "docs")
    assert during.returncode == 4 and "after `pgreembed migrate finalize`" in during.stderr


def test_disk_budget_sizes() -> None:
    assert [parse_size(s) for s in ("1234", "500MB", "1.5GiB", "2 tb")] == [
        1234, 500 * 10**6, int(1.5 * 2**30), 2 * 10**12]
    with pytest.raises(ConfigError, match="--disk-budget"):
        parse_size("lots")


@pytest.mark.second_server
def test_cancel_gives_the_new_vectors_space_back_and_resumes_after_a_kill(
        ordinary_roles: tuple[Stack, OrdinaryRoles], fake_openai: Any) -> None:
    """A cancelled migration cleared its column's vectors before DROP COLUMN (it left a
    whole copy on disk, as finalize did), as users' databases are: an ordinary role,
    REPEATABLE READ by default, an app view and function on the vector column, the app
    editing rows and holding some locked, the new model's provider slowed. Killed while
    clearing, cancel resumes; meanwhile nothing may swap, resume or index that column."""
    stack, roles = ordinary_roles
    write_config(stack.config_path, docs_config(batch_size=20, max_inflight_rows=80).replace(
        '"fake-384"', f'"{OLD}"').replace("dimensions = 384", f"dimensions = {DIMS}"))
    repeatable_read_by_default(stack)
    with psycopg.connect(stack.dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pgstattuple")
    seed(stack, ROWS_SMALL * 5)
    assert stack.cli("init").returncode == 0
    create_app_objects(stack, roles)
    stack.start_worker(threads=2)
    stack.start_scheduler()
    wait_filled(stack, "embedding")
    before = sizes(stack)
    fake_openai.set_faults(slow_model=NEW, slow_model_latency=0.3)
    column = start_migration(stack, "--model", NEW, "--dimensions", str(DIMS))
    wait_for(lambda: nulls(stack, column) <= ROWS_SMALL, timeout=120,
             message=f"{column} mostly filled")
    with editing(stack, per_second=20, rows=ROWS_SMALL * 5):
        app = holding_rows(stack, 2.0)  # cancel clears around them, then takes them
        killed = cli(stack, "migrate", "cancel", crash_at="cancel_begun")
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        for step in (("migrate", "swap"), ("migrate", "resume"), ("migrate", "index")):
            refused = cli(stack, *step)
            assert refused.returncode == 4, (step, refused.stdout, refused.stderr[-2000:])
            assert "cancel has begun clearing" in refused.stderr, step
        killed = cli(stack, "migrate", "cancel", crash_at="cancel_cleared")
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        # Every new vector gone, but what batches already at the provider when cancel
        # paused the column wrote after (at most the in-flight rows; DROP COLUMN takes them).
        assert nulls(stack, column) >= ROWS_SMALL * 5 - 80
        done = cli(stack, "migrate", "cancel")
        assert done.returncode == 0, done.stderr[-2000:]
        app.close()
    after = sizes(stack)
    print(json.dumps({"before": before, "after": after}))
    assert after["data"] <= 1.1 * before["data"], (before, after)
    with stack.connect() as conn:
        assert conn.execute("SELECT phase FROM pgreembed.migrations").fetchall() == [
            ("cancelled",)]
    wait_filled(stack, "embedding")
    assert_column_current(stack, "embedding", OLD, DIMS)
    assert_app_reads_live(roles)
