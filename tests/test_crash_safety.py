"""Crash safety and concurrent commands of migrations, on real services.

- A real SIGKILL right after each step's commit (the PGREEMBED_CRASH_AT test hook,
  pgreembed.migrations.crash_point) of a side fill run by `tick`, and of a manual
  migration run by its CLI steps: the next run completes it.
- Two `migrate index` at once: one build, its index kept (not dropped and rebuilt).
- A `migrate pause` that read the phase before a swap and writes after it, and a
  spend-cap check on a slot loaded before a swap: the column that became live is not
  left paused.
- A swap waiting for the migration's row (held by a pause or a spend reservation) does
  not hold the app's table meanwhile (lock order: migration row, then table).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

from pgreembed.config import load_settings
from pgreembed.errors import EXIT_REFUSED
from pgreembed.migrations.crash_point import CRASH_AT
from pgreembed.store.pool import connect
from pgreembed.store.slots import load_slots
from pgreembed.store.usage import enforce_spend_cap
from pgreembed.testing.fake_openai import FakeOpenAIServer
from tests.helpers import (
    ROOT,
    Stack,
    assert_column_current,
    docs_config,
    in_background,
    json_document,
    migrations,
    seed,
    side_fill_section,
    steady_writer,
    vector_columns,
    wait_filled,
    wait_for,
    write_config,
)

OLD, NEW = "fake-384", "fake-alt-384"
SIDE_FILL = side_fill_section(grace_seconds=1)


def run(stack: Stack, *args: str, crash_at: str | None = None, timeout: float = 120
        ) -> subprocess.CompletedProcess[str]:
    """The CLI; with `crash_at`, the process SIGKILLs itself right after that step's commit."""
    env = {**stack.env, **({CRASH_AT: crash_at} if crash_at else {})}
    return subprocess.run([sys.executable, "-m", "pgreembed", *args], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def killed(result: subprocess.CompletedProcess[str], point: str) -> None:
    assert result.returncode == -signal.SIGKILL, (
        f"expected a SIGKILL at {point!r}, got exit {result.returncode}:\n"
        f"{result.stdout}{result.stderr[-3000:]}")


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    return result.stdout


def indexes_on_docs(stack: Stack) -> list[tuple[int, str, bool]]:
    """(oid, name, valid) of every ANN (hnsw/ivfflat) index on docs."""
    with stack.connect() as conn:
        return [(int(r[0]), str(r[1]), bool(r[2])) for r in conn.execute(
            "SELECT c.oid::int, c.relname, i.indisvalid FROM pg_index i"
            " JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am am ON am.oid = c.relam"
            " WHERE i.indrelid = 'docs'::regclass AND am.amname IN ('hnsw', 'ivfflat')"
            " ORDER BY c.relname")]


def embedded_then_indexed(stack: Stack, rows: int, worker_extra: str = "") -> None:
    """`rows` rows embedded by a worker (through `tick --wait`), then the app's HNSW index."""
    write_config(stack.config_path, docs_config(batch_size=16, max_inflight_rows=128,
                                                worker_extra=worker_extra))
    seed(stack, rows)
    ok(run(stack, "init"))
    stack.start_worker(threads=4)
    ok(run(stack, "tick", "--wait", "--timeout", "60"))
    with stack.connect() as conn:
        conn.execute("CREATE INDEX docs_embedding_idx ON docs USING hnsw"
                     " (embedding vector_cosine_ops)")


def test_side_fill_killed_at_every_step_boundary_completes_after_a_restart(
        stack: Stack, fake_openai: FakeOpenAIServer) -> None:
    """A cron `tick` drives the side fill; each tick is SIGKILLed right after one step's
    commit (start, copy, index, swap, finalize), the next tick goes on from there."""
    embedded_then_indexed(stack, 60, SIDE_FILL)
    fake_openai.set_faults(slow_model=OLD, slow_model_latency=0.1)
    seen = []
    with steady_writer(stack, per_second=5.0, edits=range(1, 61)) as writes:
        seed(stack, 300)  # a bulk import: far above the side fill's threshold
        for point in ("start", "copy", "index", "swap", "finalize"):
            killed(run(stack, "tick", "--wait", "--timeout", "45", crash_at=point,
                       timeout=90), point)
            seen.append(migrations(stack)[-1][:2])
    assert seen == [("backlog", "filling")] * 3 + [("backlog", "swapped"),
                                                    ("backlog", "finalized")]
    assert writes["edits"] > 0 and writes["errors"] == 0
    fake_openai.set_faults(slow_model=None, slow_model_latency=0.0)
    ok(run(stack, "tick", "--wait", "--timeout", "60"))
    wait_filled(stack, "embedding")
    assert [m[:2] for m in migrations(stack)] == [("backlog", "finalized")]
    assert vector_columns(stack) == {"embedding"}
    assert [i[1:] for i in indexes_on_docs(stack)] == [("docs_embedding_idx", True)]
    with stack.connect() as conn:
        paused = conn.execute("SELECT paused FROM pgreembed.slots WHERE role = 'live'"
                              ).fetchall()
    assert paused == [(False,)]
    assert_column_current(stack, "embedding", OLD, 384)


def test_manual_migration_killed_after_each_step_completes_when_it_is_run_again(
        stack: Stack, fake_openai: FakeOpenAIServer) -> None:
    """`migrate start|index|swap|finalize`, each SIGKILLed right after its commit, then run
    again: each re-run finishes its step (exit 0), and the migration ends as without kills."""
    embedded_then_indexed(stack, 40)
    stack.start_scheduler()
    fake_openai.set_faults(slow_model=NEW, slow_model_latency=0.1)
    target = ("--target", "docs")
    start = ("migrate", "start", *target, "--model", NEW, "--dimensions", "384")
    with steady_writer(stack, per_second=5.0, edits=range(1, 41)) as writes:
        killed(run(stack, *start, crash_at="start"), "start")
        ok(run(stack, *start))
        status = json_document(ok(run(stack, "migrate", "status", *target, "--json")))
        wait_filled(stack, status["column"], at_most=10)  # the writer's latest rows
        for step, then in (("index", "filling"), ("swap", "swapped"),
                           ("finalize", "finalized")):
            killed(run(stack, "migrate", step, *target, crash_at=step), step)
            assert migrations(stack)[-1][1] == then
            again = ok(run(stack, "migrate", step, *target))
            assert migrations(stack)[-1][1] == then
            if step != "index":  # a re-run of index checks the index it finds valid
                assert f"{step} was already done (committed by an earlier run): nothing" \
                       " to do" in again, again
    assert writes["edits"] > 0 and writes["errors"] == 0
    fake_openai.set_faults(slow_model=None, slow_model_latency=0.0)
    wait_filled(stack, "embedding")
    assert [m[1] for m in migrations(stack)] == ["finalized"]
    assert vector_columns(stack) == {"embedding"}
    assert [i[1:] for i in indexes_on_docs(stack)] == [("docs_embedding_idx", True)]
    assert_column_current(stack, "embedding", NEW, 384)


def migration_filled(stack: Stack, rows: int) -> None:
    """`rows` rows embedded in the live column, and a migration to NEW filled (no
    scheduler left running: the commands under test are the only ones acting)."""
    seed(stack, rows)
    ok(run(stack, "init"))
    stack.start_worker(threads=4)
    ok(run(stack, "tick", "--wait", "--timeout", "60"))
    ok(run(stack, "migrate", "start", "--target", "docs", "--model", NEW, "--dimensions",
           "384"))
    ok(run(stack, "tick", "--wait", "--timeout", "60"))


def spawn(stack: Stack, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "pgreembed", *args], env=stack.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)


def finished(process: subprocess.Popen[str], timeout: float = 60) -> tuple[int, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out + err


@contextmanager
def build_sampler(stack: Stack) -> Iterator[set[tuple[int, int]]]:
    """(pid, index oid) of every CREATE INDEX seen on docs, sampled every 10 ms (a build's
    first moments show index oid 0: the index is not created yet)."""
    seen: set[tuple[int, int]] = set()
    stop = threading.Event()

    def sample() -> None:
        with psycopg.connect(stack.dsn, autocommit=True) as conn:
            while not stop.is_set():
                for pid, oid in conn.execute(
                        "SELECT pid, index_relid::int FROM pg_stat_progress_create_index"
                        " WHERE relid = 'docs'::regclass AND index_relid <> 0"):
                    seen.add((int(pid), int(oid)))
                stop.wait(0.01)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join(10)


def test_two_concurrent_migrate_index_build_one_index_once(
        stack: Stack, fake_openai: FakeOpenAIServer) -> None:
    """The first build waits (a writer holds the table), INVALID as every build in progress
    is; a second `migrate index` must wait for it, not drop it and build again."""
    migration_filled(stack, 200)
    index = ("migrate", "index", "--target", "docs")
    writer = psycopg.connect(stack.dsn)
    writer.execute("LOCK TABLE docs IN ROW EXCLUSIVE MODE")  # an app transaction in flight
    with build_sampler(stack) as builds:
        first = spawn(stack, *index)
        with stack.connect() as conn:
            building = wait_for(lambda: conn.execute(
                "SELECT index_relid::int FROM pg_stat_progress_create_index"
                " WHERE relid = 'docs'::regclass AND index_relid <> 0").fetchone(),
                timeout=30, message="the first build started")[0]
            second = spawn(stack, *index)
            # The second one is at the build in progress: dropping it, or waiting for it
            # (polling the build's advisory lock and who holds it).
            wait_for(lambda: conn.execute(
                "SELECT 1 FROM pg_stat_activity WHERE datname = current_database()"
                " AND pid <> pg_backend_pid()"
                " AND (query LIKE 'DROP INDEX%%' OR query LIKE '%%hashtextextended%%')"
                ).fetchone(), timeout=30, message="the second `migrate index` at the build")
        writer.rollback()
        results = [finished(first), finished(second)]
    writer.close()
    assert [code for code, _ in results] == [0, 0], results
    ann = [i for i in indexes_on_docs(stack) if i[1] != "docs_embedding_idx"]
    assert ann == [(building, ann[0][1], True)], (
        f"the build in progress (oid {building}) was dropped and built again: {ann}")
    assert {oid for _, oid in builds} == {building} and len(builds) == 1, builds


def test_a_pause_that_read_the_phase_before_a_swap_leaves_the_new_live_column_running(
        stack: Stack, fake_openai: FakeOpenAIServer) -> None:
    """Forced interleaving: `migrate pause` reads the migration (filling), is stopped
    (SIGSTOP) before it writes; `migrate swap` commits; the pause goes on."""
    migration_filled(stack, 40)
    pause: subprocess.Popen[str] | None = None
    try:
        with psycopg.connect(stack.dsn) as gate:
            gate.execute("LOCK TABLE pgreembed.migrations IN ACCESS EXCLUSIVE MODE")
            gate_pid = gate.info.backend_pid
            pause = spawn(stack, "migrate", "pause", "--target", "docs")
            with stack.connect() as conn:
                pid = wait_for(lambda: conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))"
                    " AND application_name = 'pgreembed'", (gate_pid,)).fetchone(),
                    timeout=30, message="the pause reading the phase")[0]
                pause.send_signal(signal.SIGSTOP)  # its read completes; it cannot go on
                gate.rollback()
                wait_for(lambda: conn.execute("SELECT state <> 'active' FROM pg_stat_activity"
                                              " WHERE pid = %s", (pid,)).fetchone()[0],
                         timeout=30, message="the pause's read done")
                swap = spawn(stack, "migrate", "swap", "--target", "docs")
                # The swap commits, or waits for a lock the stopped pause holds.
                wait_for(lambda: swap.poll() is not None or conn.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))",
                    (pid,)).fetchone(), timeout=60, interval=0.01, message="the swap")
    finally:
        if pause is not None:  # never leave a stopped process behind
            pause.send_signal(signal.SIGCONT)
    paused = finished(pause)
    swapped = finished(swap)
    assert swapped[0] == 0, swapped
    status = json_document(ok(run(stack, "migrate", "status", "--target", "docs", "--json")))
    assert status["phase"] == "swapped"
    with stack.connect() as conn:
        live = conn.execute("SELECT paused, paused_by FROM pgreembed.slots"
                            " WHERE role = 'live'").fetchall()
    assert live == [(False, None)], f"the new live column was paused: {paused}"
    assert status["paused"] is False
    if paused[0] != 0:  # refused: the migration it read was swapped meanwhile
        assert "swapped" in paused[1], paused


def test_a_swap_waiting_for_the_migration_row_does_not_hold_the_app_table(
        stack: Stack, fake_openai: FakeOpenAIServer) -> None:
    """A transaction holds the migration's row (as a spend reservation or a pause does)
    while a swap runs: the swap waits for that row before it locks the table, so the app's
    queries (each allowed 50 ms of lock wait) never queue behind it."""
    migration_filled(stack, 40)
    stalled = {"queries": 0, "lock_timeouts": 0}

    def app(stop: threading.Event) -> None:
        with psycopg.connect(stack.dsn, autocommit=True) as conn:
            conn.execute("SET lock_timeout = '50ms'")
            while not stop.is_set():
                try:
                    conn.execute("SELECT count(*) FROM docs WHERE id = 1").fetchone()
                    stalled["queries"] += 1
                except psycopg.errors.LockNotAvailable:
                    stalled["lock_timeouts"] += 1
                stop.wait(0.005)

    with in_background(app), psycopg.connect(stack.dsn) as holder:
        holder.execute("SELECT 1 FROM pgreembed.migrations WHERE phase = 'filling'"
                       " FOR UPDATE")
        swap = spawn(stack, "migrate", "swap", "--target", "docs")
        with stack.connect() as conn:
            def swap_waiting() -> bool:
                return bool(conn.execute(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE %s = ANY(pg_blocking_pids(pid))",
                    (holder.info.backend_pid,)).fetchone()[0])

            for _ in range(5):  # five lock attempts of the swap (100 ms each), seen waiting
                wait_for(swap_waiting, timeout=30, interval=0.005, message="a swap attempt")
                wait_for(lambda: not swap_waiting(), timeout=30, interval=0.005,
                         message="the attempt given up")
        holder.rollback()
        code, output = finished(swap)
    assert code == 0, output
    assert stalled["queries"] > 0
    assert stalled["lock_timeouts"] == 0, (
        f"{stalled['lock_timeouts']} app queries timed out behind the swap's table lock")


def test_a_busy_migration_row_is_named_and_a_cancel_killed_after_its_commit_is_done(
        stack: Stack, fake_openai: FakeOpenAIServer) -> None:
    """A swap that gives up on the migration's row (held as a pause or a spend reservation
    holds it) names that row and its holder, not the table's blockers (there are none); a
    cancel SIGKILLed right after its commit, run again, says it was already done."""
    migration_filled(stack, 20)
    with psycopg.connect(stack.dsn, application_name="row-holder") as holder:
        holder.execute("SELECT 1 FROM pgreembed.migrations WHERE phase = 'filling'"
                       " FOR UPDATE")
        busy = run(stack, "migrate", "swap", "--target", "docs", "--lock-wait", "1")
        holder_pid = holder.info.backend_pid
        holder.rollback()
    assert busy.returncode == EXIT_REFUSED, busy.stdout + busy.stderr
    assert "Traceback" not in busy.stderr and "nobody now" not in busy.stderr, busy.stderr
    assert "could not swap: the migration row of target 'docs' stayed locked" in busy.stderr
    assert f"Held by: pid {holder_pid} (row-holder, idle in transaction" in busy.stderr
    killed(run(stack, "migrate", "cancel", "--target", "docs", crash_at="cancel"), "cancel")
    assert migrations(stack)[-1][1] == "cancelled"
    again = ok(run(stack, "migrate", "cancel", "--target", "docs"))
    assert "cancel was already done (committed by an earlier run): nothing to do" in again
    assert vector_columns(stack) == {"embedding"}


def test_the_spend_cap_of_a_slot_read_before_a_swap_never_pauses_the_new_live_column(
        stack: Stack, fake_openai: FakeOpenAIServer) -> None:
    """The scheduler's pass holds the slots it loaded (the new column: 'next', its cap
    reached) while a swap commits; its spend-cap check then runs on what is live now."""
    migration_filled(stack, 30)
    with stack.connect() as conn:  # the cap is reached: any spend at all crosses it
        conn.execute("UPDATE pgreembed.migrations SET spend_cap_usd = 1e-12,"
                     " price_per_mtoken = 1")
        conn.execute("INSERT INTO pgreembed.usage (slot_id, inputs, tokens)"
                     " SELECT to_slot, 1, 1000 FROM pgreembed.migrations")
    settings = load_settings(stack.config_path, stack.env)
    with connect(stack.dsn) as conn:
        loaded = next(s for s in load_slots(conn, settings.target("docs"))
                      if s.role == "next")
        conn.commit()
        ok(run(stack, "migrate", "swap", "--target", "docs"))
        paused = enforce_spend_cap(conn, loaded)
    with stack.connect() as conn:
        live = conn.execute("SELECT paused, paused_by FROM pgreembed.slots"
                            " WHERE role = 'live'").fetchall()
    assert live == [(False, None)], "the spend cap paused the column that is live"
    assert paused is False
