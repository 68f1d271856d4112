"""pgreembed as an ordinary role, as on managed Postgres: a member of the table's owner
role with CREATE on the database, no superuser and none of the optional grants, next to
an app that logs in as a role of its own (tests.helpers.OrdinaryRoles)."""

from __future__ import annotations

import json
import logging
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from psycopg import sql

from pgreembed.errors import TableBusyError
from pgreembed.store.blockers import ACCESS_EXCLUSIVE
from pgreembed.store.table_lock import LockPolicy, run_locked
from pgreembed.testing.fake_openai import FakeOpenAIServer
from tests.helpers import (
    OrdinaryRoles,
    Stack,
    docs_config,
    end_transaction_after,
    json_document,
    new_column,
    seed,
    side_fill_section,
    wait_filled,
    wait_for,
    write_config,
)

SIDE_FILL = side_fill_section(grace_seconds=2)


def run(stack: Stack, *args: str, codes: tuple[int, ...] = (0,)
        ) -> subprocess.CompletedProcess[str]:
    """A pgreembed command as pgreembed's role: the exit code wanted, never a traceback."""
    out = stack.cli(*args, timeout=180)
    assert out.returncode in codes, f"{args}: {out.returncode}\n{out.stdout}\n{out.stderr}"
    assert "Traceback" not in out.stderr, out.stderr
    return out


def step(stack: Stack, *args: str) -> dict[str, Any]:
    return json_document(run(stack, "migrate", *args, "--target", "docs", "--json").stdout)


def migration_filled(stack: Stack) -> None:
    """300 rows embedded by fake-384, a migration to fake-alt-384 started and filled."""
    write_config(stack.config_path, docs_config(batch_size=16, max_inflight_rows=128))
    seed(stack, 300)
    run(stack, "init")
    stack.start_worker(threads=4)
    stack.start_scheduler()
    wait_filled(stack, "embedding")
    run(stack, "migrate", "start", "--target", "docs", "--model", "fake-alt-384",
        "--dimensions", "384")
    wait_filled(stack, new_column(stack))


def idle_app_session(roles: OrdinaryRoles, seconds: float) -> psycopg.Connection:
    """The app (its own role) reads the table and sits idle in its transaction."""
    app = psycopg.connect(roles.app_dsn, application_name="app-report")
    app.execute("SELECT count(*) FROM docs")
    end_transaction_after(app, seconds)
    return app


@pytest.mark.second_server
def test_the_whole_lifecycle_as_an_ordinary_role(
        ordinary_roles: tuple[Stack, OrdinaryRoles], fake_openai: FakeOpenAIServer) -> None:
    stack, roles = ordinary_roles
    write_config(stack.config_path, docs_config(batch_size=16, max_inflight_rows=128,
                                                worker_extra=SIDE_FILL))
    seed(stack, 60)
    run(stack, "init")
    worker = stack.start_worker(threads=4)
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
    column = new_column(stack)
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
    # The workers stop first: 4 threads drained the 300 rows (many copies of texts the
    # table holds) below the threshold before the scheduler's check now and then.
    worker.terminate()
    worker.wait(timeout=60)
    seed(stack, 300)
    wait_for(lambda: ("backlog" in {reason for reason, _ in migration_phases(stack)}),
             timeout=60, interval=0.5, message="the scheduler starting a side fill")
    stack.start_worker(threads=4)
    wait_for(lambda: migration_phases(stack)[-1:] == [("backlog", "finalized")],
             timeout=300, interval=0.5, message="the side fill finalized")
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


def test_init_into_a_schema_an_admin_made(ordinary_roles: tuple[Stack, OrdinaryRoles]) -> None:
    """No CREATE on the database: the admin made schema pgreembed for pgreembed's role."""
    stack, roles = ordinary_roles
    with psycopg.connect(stack.dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("REVOKE CREATE ON DATABASE {} FROM {}").format(
            sql.Identifier(admin.info.dbname), sql.Identifier(roles.pgreembed)))
        admin.execute("CREATE SCHEMA pgreembed")
        admin.execute(sql.SQL("GRANT USAGE, CREATE ON SCHEMA pgreembed TO {}").format(
            sql.Identifier(roles.pgreembed)))
    seed(stack, 5)
    run(stack, "init")
    run(stack, "init")  # and again, as every scheduler start does


@contextmanager
def crawling_autovacuum(stack: Stack, *, wraparound: bool = False, quiet: bool = False
                        ) -> Iterator[int]:
    """An autovacuum of docs held for seconds: cost-based delay at its slowest on this table
    and a 1 s naptime (server-wide while it lasts); yields its pid. `wraparound`: one run to
    prevent wraparound (the table's freeze age over its own autovacuum_freeze_max_age);
    `quiet`: track_activities off (no query text, no pg_stat_progress_vacuum)."""
    options = ("autovacuum_vacuum_cost_delay", "autovacuum_vacuum_cost_limit",
               "autovacuum_vacuum_threshold", "autovacuum_vacuum_scale_factor",
               "autovacuum_freeze_max_age")
    with psycopg.connect(stack.dsn, autocommit=True) as admin:
        admin.execute("ALTER SYSTEM SET autovacuum_naptime = 1")
        if quiet:
            admin.execute("ALTER SYSTEM SET track_activities = off")
        admin.execute("SELECT pg_reload_conf()")
        try:
            if wraparound:  # 100,001 transactions: the table's age passes 100,000
                admin.execute("SET synchronous_commit = off")
                admin.execute("DO $$ BEGIN FOR i IN 1..100001 LOOP PERFORM"
                              " pg_current_xact_id(); COMMIT; END LOOP; END $$")
            admin.execute("ALTER TABLE docs SET (autovacuum_vacuum_cost_delay = 100,"
                          " autovacuum_vacuum_cost_limit = 1, autovacuum_vacuum_threshold = 0,"
                          " autovacuum_vacuum_scale_factor = 0"
                          + (", autovacuum_freeze_max_age = 100000)" if wraparound else ")"))
            admin.execute("UPDATE docs SET views = views + 1")
            admin.execute("SELECT pg_stat_force_next_flush()")

            def running() -> int | None:
                row = admin.execute(
                    "SELECT l.pid FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
                    " WHERE l.relation = 'docs'::regclass AND l.granted"
                    " AND a.backend_type = 'autovacuum worker'").fetchone()
                return None if row is None else int(row[0])

            yield wait_for(running, timeout=60, message="an autovacuum of docs runs")
        finally:
            admin.execute("ALTER SYSTEM RESET autovacuum_naptime")
            admin.execute("ALTER SYSTEM RESET track_activities")
            admin.execute("SELECT pg_reload_conf()")
            # The autovacuum is ended as the admin would, and the table's options reset; a
            # worker the launcher starts again in between (as anti-wraparound and as slow
            # while the options last) would hold the table for minutes (a CI run's
            # rollback waited 60 s on one): cancel and retry until the reset went through.
            admin.execute("SET lock_timeout = '500ms'")

            def reset() -> bool:
                admin.execute("SELECT pg_cancel_backend(l.pid) FROM pg_locks l JOIN"
                              " pg_stat_activity a USING (pid) WHERE l.relation ="
                              " 'docs'::regclass AND a.backend_type = 'autovacuum worker'")
                try:
                    admin.execute(sql.SQL("ALTER TABLE docs RESET ({})").format(
                        sql.SQL(", ").join(map(sql.SQL, options))))
                except psycopg.errors.LockNotAvailable:
                    return False
                return True

            wait_for(reset, timeout=60, interval=0.2, message="the table's options reset")


@pytest.mark.parametrize("read_all_stats", [True, False], ids=["pg_read_all_stats", "bare"])
def test_a_swap_behind_an_autovacuum_it_may_not_cancel(
        ordinary_roles: tuple[Stack, OrdinaryRoles], read_all_stats: bool) -> None:
    """Without pg_signal_autovacuum_worker, an autovacuum holding the table is said once,
    never a permission error, and cancelled by Postgres itself for a SHARE UPDATE EXCLUSIVE
    request of ours that waits past deadlock_timeout (no app query waits on that mode): the
    swap goes through within seconds. With pg_read_all_stats an idle app session
    `--terminate-idle-after` may not end (no pg_signal_backend) is waited out."""
    stack, roles = ordinary_roles
    if read_all_stats:
        with psycopg.connect(stack.dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("GRANT pg_read_all_stats TO {}").format(
                sql.Identifier(roles.pgreembed)))
    migration_filled(stack)

    with crawling_autovacuum(stack) as pid:
        swapped = run(stack, "migrate", "swap", "--target", "docs", "--lock-wait", "20")
        assert f"pid {pid}, an autovacuum, holds the table; this role may not cancel it" \
            in swapped.stderr
        assert "was cancelled by Postgres for our SHARE UPDATE EXCLUSIVE request" \
            in swapped.stderr
    if read_all_stats:
        app = idle_app_session(roles, 4.0)
        rolled = run(stack, "migrate", "rollback", "--target", "docs", "--lock-wait", "60",
                     "--terminate-idle-after", "1")
        app.close()
        assert f'GRANT pg_signal_backend TO "{roles.pgreembed}";' in rolled.stderr
    assert "Traceback" not in stack.log_text()


def test_terminate_idle_after_never_tries_a_session_this_role_may_not_end(
        ordinary_roles: tuple[Stack, OrdinaryRoles], caplog: pytest.LogCaptureFixture) -> None:
    """With pg_read_all_stats but not pg_signal_backend, an idle app session of another
    role is known up front to be beyond --terminate-idle-after: it is said once (naming
    the GRANT), never attempted, and the final advice does not suggest the flag given."""
    stack, roles = ordinary_roles
    with psycopg.connect(stack.dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("GRANT pg_read_all_stats TO {}").format(
            sql.Identifier(roles.pgreembed)))
    app = idle_app_session(roles, 30.0)
    caplog.set_level(logging.WARNING, logger="pgreembed")
    try:
        with pytest.raises(TableBusyError) as busy:
            run_locked(roles.pgreembed_dsn, sql.Identifier("docs"), "swap",
                       lambda conn: conn.execute("LOCK TABLE docs IN ACCESS EXCLUSIVE MODE"),
                       LockPolicy(wait_seconds=3, terminate_idle_after=1),
                       mode=ACCESS_EXCLUSIVE)
        app_pid = app.info.backend_pid
        alive = app.execute("SELECT 1").fetchone()  # never ended
    finally:
        app.close()
    assert alive == (1,)
    grant = f'GRANT pg_signal_backend TO "{roles.pgreembed}";'
    lines = [r.getMessage() for r in caplog.records]
    about_the_app = [line for line in lines if f"pid {app_pid} " in line
                     and "table busy" not in line]
    assert len(about_the_app) == 1, lines
    assert "--terminate-idle-after cannot end" in about_the_app[0] and grant in about_the_app[0]
    message = str(busy.value)
    assert "--terminate-idle-after ends idle ones" not in message
    assert grant in message


def test_an_autovacuum_is_cancelled_unless_it_prevents_wraparound(
        stack: Stack, fake_openai: FakeOpenAIServer) -> None:
    """As a superuser: an ordinary autovacuum holding the table is cancelled for the swap,
    as Postgres does for a lock waiter; one preventing wraparound never is, told by the
    table's age (track_activities is off: no query text says it)."""
    migration_filled(stack)
    with crawling_autovacuum(stack, quiet=True) as pid:
        swapped = run(stack, "migrate", "swap", "--target", "docs", "--lock-wait", "30")
        assert f"cancelled pid {pid} (autovacuum" in swapped.stderr
    with crawling_autovacuum(stack, wraparound=True, quiet=True) as pid:
        busy = run(stack, "migrate", "rollback", "--target", "docs", "--lock-wait", "3",
                   codes=(4,))
        assert f"pid {pid} is an autovacuum to prevent transaction ID wraparound, never" \
            " cancelled" in busy.stderr
        assert "cancelled pid" not in busy.stderr
    run(stack, "migrate", "rollback", "--target", "docs", "--lock-wait", "60")
    assert "Traceback" not in stack.log_text()


def test_a_role_that_may_not_change_the_table_is_told_what_to_grant(
        ordinary_roles: tuple[Stack, OrdinaryRoles]) -> None:
    stack, roles = ordinary_roles
    with psycopg.connect(stack.dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("REVOKE {} FROM {}").format(
            sql.Identifier(roles.owner), sql.Identifier(roles.pgreembed)))
    refused = stack.cli("init")
    assert refused.returncode == 4 and "Traceback" not in refused.stderr
    assert (f"make it a member of the table's owner role, `GRANT \"{roles.owner}\" TO"
            f" \"{roles.pgreembed}\";`") in refused.stderr
    doctor = json_document(run(stack, "doctor", "--json", codes=(1,)).stdout)
    role = next(f for f in doctor["findings"] if f["check"] == "role")
    assert role["level"] == "error" and f'GRANT "{roles.owner}" TO' in role["message"]


def test_a_right_revoked_while_running_is_named_and_fails_no_row(
        ordinary_roles: tuple[Stack, OrdinaryRoles], fake_openai: FakeOpenAIServer) -> None:
    """pgreembed's role loses the owner's rights while running: the log names the lost
    right and doctor (the scheduler logged only Postgres's message, the workers a
    traceback per retry), no row is marked failed, and the rows land once the grant is
    back."""
    stack, roles = ordinary_roles
    write_config(stack.config_path, docs_config(batch_size=8))
    seed(stack, 8)
    assert stack.cli("init").returncode == 0
    stack.start_worker(threads=2)
    stack.start_scheduler()
    wait_filled(stack, "embedding")
    owner, role = sql.Identifier(roles.owner), sql.Identifier(roles.pgreembed)
    with psycopg.connect(stack.dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("REVOKE {} FROM {}").format(owner, role))
    seed(stack, 8)
    # The scheduler's pass (it reads the table) or a worker's batch (rights lost after
    # its rows were sent) names it.
    wait_for(lambda: "pgreembed's role lost a right it needs" in stack.log_text(),
             timeout=60, message="the lost right named in the log")
    assert "`pgreembed doctor` names the grant" in stack.log_text()
    with psycopg.connect(stack.dsn, autocommit=True) as admin:
        failed = admin.execute("SELECT count(*) FROM pgreembed.slot_1"
                               " WHERE pgr_failed_at IS NOT NULL").fetchone()
        admin.execute(sql.SQL("GRANT {} TO {}").format(owner, role))
    assert failed == (0,)
    wait_filled(stack, "embedding")


def test_a_member_that_does_not_inherit_is_told_the_statement_that_works(
        ordinary_roles: tuple[Stack, OrdinaryRoles]) -> None:
    """A membership without inheritance (GRANT ... WITH INHERIT FALSE; NOINHERIT before
    Postgres 16): granting it again only prints "already been granted", so the advice is
    the statement that lets the role use the owner's rights, and pasted it works."""
    stack, roles = ordinary_roles
    owner, role = sql.Identifier(roles.owner), sql.Identifier(roles.pgreembed)
    with psycopg.connect(stack.dsn, autocommit=True) as admin:
        if admin.info.server_version >= 160000:
            admin.execute(sql.SQL("REVOKE {} FROM {}").format(owner, role))
            admin.execute(sql.SQL("GRANT {} TO {} WITH INHERIT FALSE").format(owner, role))
        else:
            admin.execute(sql.SQL("ALTER ROLE {} NOINHERIT").format(role))
    refused = stack.cli("init")
    assert refused.returncode == 4, refused.stdout + refused.stderr
    advice = refused.stderr.split("without inheriting them: `", 1)[1].split("`", 1)[0]
    with psycopg.connect(stack.dsn, autocommit=True) as admin:
        admin.execute(advice.encode())
    assert stack.cli("init").returncode == 0


def test_init_and_doctor_give_the_same_advice_and_it_works_pasted(
        ordinary_roles: tuple[Stack, OrdinaryRoles]) -> None:
    """No CREATE on the table's schema (CREATE INDEX needs it) and an admin-made schema
    pgreembed with USAGE only: init refuses before any DDL and doctor reports it, word for
    word the same, as statements that, run as the admin, are all init was missing."""
    stack, roles = ordinary_roles
    with psycopg.connect(stack.dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("REVOKE CREATE ON SCHEMA public FROM {}").format(
            sql.Identifier(roles.owner)))
        admin.execute(sql.SQL("REVOKE CREATE ON DATABASE {} FROM {}").format(
            sql.Identifier(admin.info.dbname), sql.Identifier(roles.pgreembed)))
        admin.execute("CREATE SCHEMA pgreembed")
        admin.execute(sql.SQL("GRANT USAGE ON SCHEMA pgreembed TO {}").format(
            sql.Identifier(roles.pgreembed)))
    seed(stack, 5)
    refused = run(stack, "init", codes=(4,))
    doctor = json_document(run(stack, "doctor", "--json", codes=(1,)).stdout)
    role = next(f for f in doctor["findings"] if f["check"] == "role")
    assert role["level"] == "error"
    assert f"pgreembed: target 'docs': {role['message']}\n" in refused.stderr, (
        refused.stderr, role["message"])
    advice = re.findall(r"`([^`]*)`", role["message"])
    assert advice == [f'GRANT CREATE ON SCHEMA "public" TO "{roles.pgreembed}";',
                      f'GRANT USAGE, CREATE ON SCHEMA pgreembed TO "{roles.pgreembed}";']
    with psycopg.connect(stack.dsn, autocommit=True) as admin:
        for statement in advice:
            admin.execute(statement)
    run(stack, "init")
    doctor = json_document(run(stack, "doctor", "--json", codes=(0, 1)).stdout)
    assert next(f for f in doctor["findings"] if f["check"] == "role")["level"] == "ok"
