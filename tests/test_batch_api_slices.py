"""A Batch API job's vectors commit in slices (migrations.batch_api), as the workers'
do: the app's rows are held a slice at a time, not the whole job's (up to 50,000) until
one commit; a step stopped between slices leaves the job "collecting", and the next step
downloads its output again, writes the rows not written yet and counts its spend once;
a second step meanwhile leaves the job to the one collecting it.

Deterministic, not timed: an app trigger stops the job's second slice at a gate (an
advisory lock this test holds) once the first has committed (tests/test_slice_races.py
does the same to the workers' batches). Before the slices, the job's 64 rows were locked
together before its first row was written: the app's statement on a row of a later slice
waited on the job, and the step's lock_timeout check below failed.
"""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys

import psycopg
from psycopg import sql

from pgreembed.store.write_slices import PROBE_ROWS
from pgreembed.testing.fake_openai import FakeOpenAIServer
from tests.app_side import assert_app_reads_live, create_app_objects, repeatable_read_by_default
from tests.helpers import (
    BATCH_LINE,
    ROOT,
    OrdinaryRoles,
    Stack,
    advisory_waiters,
    assert_column_current,
    counts,
    migrate,
    running,
    seed,
    slice_gate,
    start_migration,
    steady_writer,
    vectors_in,
    wait_filled,
    wait_for,
)

ROWS = 64  # one job: the probe slice (8 rows), the gated one, then the rest
HELD = (3, 4)  # rows of the first slice an app transaction holds while it is written
GATE = 7_305_002  # the gate's advisory lock key
NEW, DIMS = "fake-768", 768


def _scalar(stack: Stack, query: sql.Composable | str, *params: object) -> int:
    with stack.connect() as conn:
        row = conn.execute(query, params).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def _versions(stack: Stack, column: str) -> dict[int, str]:
    """xmin of each row with a vector in `column`: a row written again gets another."""
    with stack.connect() as conn:
        return {key: version for key, version in conn.execute(sql.SQL(
            "SELECT id, xmin::text FROM docs WHERE {} IS NOT NULL").format(
                sql.Identifier(column)))}


def _job_ledger_rows(stack: Stack) -> int:
    """Usage rows of the new column's slot that bill the whole job's inputs."""
    return _scalar(stack, "SELECT count(*) FROM pgreembed.usage u JOIN pgreembed.slots s"
                          " ON s.id = u.slot_id WHERE s.role = 'next' AND u.inputs = %s", ROWS)


def test_a_jobs_vectors_commit_in_slices_and_a_stopped_step_resumes_counting_once(
        ordinary_roles: tuple[Stack, OrdinaryRoles], fake_openai: FakeOpenAIServer) -> None:
    stack, roles = ordinary_roles
    repeatable_read_by_default(stack)
    app = dataclasses.replace(stack, dsn=roles.app_dsn)
    seed(stack, ROWS)
    running(stack)
    create_app_objects(stack, roles)
    wait_filled(stack, "embedding")
    fake_openai.set_faults(latency=0.3)  # the workers' provider, slowed
    column = start_migration(stack, "--model", NEW, "--dimensions", str(DIMS), "--batch-api")
    submitted = migrate(stack, "batch")
    assert counts(BATCH_LINE, submitted) == [(ROWS, 0, 0, 0, 1)], submitted

    with steady_writer(app, per_second=10.0, edits=range(33, ROWS + 1)) as writes, \
            stack.connect() as gate, psycopg.connect(roles.app_dsn) as holder:
        gate.execute(slice_gate(column, GATE))
        gate.execute("SELECT pg_advisory_lock(%s)", (GATE,))
        holder.execute("UPDATE docs SET views = views + 1 WHERE id = ANY(%s)", (list(HELD),))
        step = subprocess.Popen([sys.executable, "-m", "pgreembed", "migrate", "batch",
                                 "--target", "docs", "--wait", "--poll", "0.2"],
                                env=stack.env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: advisory_waiters(stack, "ShareLock") == 1, timeout=60,
                     message="the job's second slice waiting at the gate")
            # The first slice committed without the rows the app holds (skipped, never
            # waited for), with the job's spend, once.
            assert vectors_in(stack, column) == PROBE_ROWS - len(HELD)
            assert _job_ledger_rows(stack) == 1
            assert _scalar(stack, "SELECT count(*) FROM pgreembed.batch_jobs"
                                  " WHERE status = 'collecting'") == 1
            # Another step meanwhile (cron's, say) leaves the job to the one collecting it.
            other_step = stack.cli("migrate", "batch", "--target", "docs", timeout=30)
            assert other_step.returncode == 0, other_step.stderr
            assert counts(BATCH_LINE, other_step.stdout) == [(0, 0, 0, 0, 1)], other_step.stdout
            assert vectors_in(stack, column) == PROBE_ROWS - len(HELD)
            # A row of a later slice is the app's to edit now: no lock of ours on it.
            with psycopg.connect(roles.app_dsn, options="-c lock_timeout=200") as other:
                other.execute("UPDATE docs SET views = views + 1 WHERE id = %s", (ROWS,))
        finally:
            step.send_signal(signal.SIGKILL)  # stopped between slices
            step.wait(30)
        gate.execute("SELECT pg_advisory_unlock(%s)", (GATE,))
        holder.commit()
        # The killed step's lease on the job ends (COLLECTOR_LEASE_SECONDS, here at once).
        with stack.connect() as conn:
            conn.execute("UPDATE pgreembed.batch_jobs SET collector_until = now()")
        first_slice = _versions(stack, column)
        assert len(first_slice) == PROBE_ROWS - len(HELD)
        # The next step resumes the job: downloads its output again, writes it, hands the
        # column back to the queue (the rows the writer edited meanwhile go there).
        resumed = migrate(stack, "batch", "--wait", "--poll", "0.2", "--timeout", "60")
        # (submitted, jobs completed, rows written, failed, open)
        [(again, completed, written, failed, still_open)] = counts(BATCH_LINE, resumed)
        assert (again, completed, failed, still_open) == (0, 1, 0, 0), resumed
        # Written again: neither the first slice's rows (the state table says this model
        # wrote them for their text) nor the rows the writer edited (33-64: pending).
        assert ROWS - 32 - len(first_slice) <= written <= ROWS - len(first_slice), resumed
        assert {key: _versions(stack, column).get(key) for key in first_slice} == first_slice
        wait_for(lambda: writes["edits"] > 5, timeout=30, message="the app's edits")
    assert writes["errors"] == 0, writes
    assert fake_openai.stats()["file_downloads"]["batch_output"] == 2
    assert _job_ledger_rows(stack) == 1  # the resumed step counted nothing again
    fake_openai.set_faults(latency=0.0)
    # Both columns: the writer's last edits cleared live vectors too, re-embedded by the
    # workers after the new column may already be full (a race CI met once).
    wait_filled(stack, column)
    wait_filled(stack, "embedding")
    assert_column_current(stack, column, NEW, DIMS)
    assert_column_current(stack, "embedding", "fake-384", 384)
    assert_app_reads_live(roles)
