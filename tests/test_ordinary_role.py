"""pgreembed as an ordinary role, as on managed Postgres: a member of the table's owner
role with CREATE on the database, no superuser and none of the optional grants, next to
an app that logs in as a role of its own (tests.helpers.OrdinaryRoles)."""

from __future__ import annotations

import json
import subprocess
import threading
from typing import Any

import psycopg

from pgreembed.testing.fake_openai import FakeOpenAIServer
from tests.helpers import (
    OrdinaryRoles,
    Stack,
    docs_config,
    json_document,
    seed,
    wait_filled,
    wait_for,
    write_config,
)

SIDE_FILL = """
[side_fill]
min_rows = 50
min_share = 0.3
grace_seconds = 2
"""


def run(stack: Stack, *args: str, codes: tuple[int, ...] = (0,)
        ) -> subprocess.CompletedProcess[str]:
    """A pgreembed command as pgreembed's role: the exit code wanted, never a traceback."""
    out = stack.cli(*args, timeout=180)
    assert out.returncode in codes, f"{args}: {out.returncode}\n{out.stdout}\n{out.stderr}"
    assert "Traceback" not in out.stderr, out.stderr
    return out


def step(stack: Stack, *args: str) -> dict[str, Any]:
    return json_document(run(stack, "migrate", *args, "--target", "docs", "--json").stdout)


def next_column(stack: Stack) -> str:
    with stack.connect() as conn:
        row = conn.execute("SELECT vector_column FROM pgreembed.slots WHERE role = 'next'"
                           ).fetchone()
    assert row is not None
    return str(row[0])


def idle_app_session(roles: OrdinaryRoles, seconds: float) -> psycopg.Connection:
    """The app (its own role) reads the table and sits idle in its transaction."""
    app = psycopg.connect(roles.app_dsn, application_name="app-report")
    app.execute("SELECT count(*) FROM docs")
    timer = threading.Timer(seconds, app.rollback)
    timer.daemon = True
    timer.start()
    return app


def test_the_whole_lifecycle_as_an_ordinary_role(
        ordinary_roles: tuple[Stack, OrdinaryRoles], fake_openai: FakeOpenAIServer) -> None:
    stack, roles = ordinary_roles
    write_config(stack.config_path, docs_config(batch_size=16, max_inflight_rows=128,
                                                worker_extra=SIDE_FILL))
    seed(stack, 60)
    run(stack, "init")
    stack.start_worker(threads=4)
    stack.start_scheduler()
    wait_filled(stack, "embedding")
    with psycopg.connect(roles.app_dsn, autocommit=True) as app:  # the app's own edits
        app.execute("UPDATE docs SET body = 'edited by the app' WHERE id <= 5")
        app.execute("INSERT INTO docs (title, body) VALUES ('app', 'inserted by the app')")
    wait_filled(stack, "embedding")
    with psycopg.connect(stack.dsn, autocommit=True) as admin:  # the app's ANN index
        admin.execute("CREATE INDEX docs_embedding_idx ON docs USING hnsw"
                      " (embedding vector_cosine_ops)")

    # A manual migration: start, fill, index, compare, swap past an idle app session,
    # rollback, finalize.
    run(stack, "migrate", "start", "--target", "docs", "--model", "fake-alt-384",
        "--dimensions", "384")
    column = next_column(stack)
    wait_filled(stack, column)
    run(stack, "migrate", "index", "--target", "docs")
    step(stack, "compare", "--sample", "10")
    app = idle_app_session(roles, 3.0)
    swapped = run(stack, "migrate", "swap", "--target", "docs", "--json", "--lock-wait", "60")
    app.close()
    assert json.loads(swapped.stdout)["step"] == "swap"
    assert "state hidden" in swapped.stderr and "pg_read_all_stats" in swapped.stderr
    assert step(stack, "rollback")["step"] == "rollback"
    run(stack, "migrate", "finalize", "--target", "docs")

    # A derived migration (no provider call): start, index, swap, rollback, finalize.
    run(stack, "migrate", "start", "--target", "docs", "--derive", "halfvec")
    run(stack, "migrate", "index", "--target", "docs")
    step(stack, "swap")
    step(stack, "rollback")
    run(stack, "migrate", "finalize", "--target", "docs")

    # A side fill the scheduler starts by itself for a bulk import, through to finalize.
    seed(stack, 300)
    wait_for(lambda: migration_phases(stack)[-1:] == [("backlog", "finalized")],
             timeout=120, interval=0.5, message="the side fill finalized")
    wait_filled(stack, "embedding")

    status = json_document(run(stack, "status", "--json").stdout)
    assert status
    doctor = json_document(run(stack, "doctor", "--json", codes=(0, 1)).stdout)
    privileges = next(f for f in doctor["findings"] if f["check"] == "privileges")
    assert privileges["level"] == "warn"
    assert privileges["details"]["grants"] == {
        "pg_read_all_stats (or pg_monitor)": False,
        "pg_signal_autovacuum_worker (Postgres 18) or superuser": False,
        "pg_signal_backend": False}
    assert all(f["level"] == "ok" for f in doctor["findings"] if f["check"] == "role")
    tuned = run(stack, "tune", "--target", "docs", "--json", "--queries", "10", codes=(0, 4))
    assert json_document(tuned.stdout)
    logs = stack.log_text()
    assert "Traceback" not in logs and "InsufficientPrivilege" not in logs


def migration_phases(stack: Stack) -> list[tuple[str | None, str]]:
    with stack.connect() as conn:
        return [(r[0], r[1]) for r in conn.execute(
            "SELECT auto_reason, phase FROM pgreembed.migrations ORDER BY id")]
