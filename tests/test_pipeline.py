"""End to end on real services: scheduler -> Redis -> Dramatiq worker -> Postgres.

Vectors are checked against the fake provider's deterministic vector of the
row's *current* text, so a vector of the wrong text, a stale write or a
missing row all fail these tests.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from pgreembed.testing.fake_vectors import fake_vector
from tests.helpers import Stack, counts, docs_config, json_document, seed, wait_for

MODEL = "fake-384"


def rows(stack: Stack) -> list[tuple[int, str, object]]:
    with stack.connect() as conn:
        return conn.execute(
            "SELECT id, concat_ws(E'\\n', title, body), embedding FROM docs ORDER BY id"
        ).fetchall()


def assert_all_current(stack: Stack) -> None:
    for key, text, vector in rows(stack):
        assert vector is not None, f"row {key} has no vector"
        expected = fake_vector(MODEL, text, 384)
        np.testing.assert_allclose(vector.to_numpy(), expected, atol=1e-6,
                                   err_msg=f"row {key} has the vector of another text")


def init(stack: Stack) -> None:
    result = stack.cli("init")
    assert result.returncode == 0, result.stderr


def test_new_rows_are_embedded(stack: Stack) -> None:
    seed(stack, 40, body="body of ")
    init(stack)
    stack.start_worker()
    result = stack.cli("tick", "--wait", "--timeout", "60")
    assert result.returncode == 0, result.stdout + result.stderr
    # One line per pass of `--wait`: one of them enqueued the 40 rows.
    assert (40,) in counts(r"enqueued (\d+) rows", result.stdout), result.stdout
    assert_all_current(stack)


def test_a_table_with_an_app_rule_on_update_is_embedded(stack: Stack) -> None:
    """An app's DO ALSO rule (an audit log, say) refuses an UPDATE inside a WITH: the
    write is plain statements, so the rows are embedded and the rule runs for each."""
    seed(stack, 40, body="body of ")
    init(stack)
    with stack.connect() as conn:
        conn.execute("CREATE TABLE vector_log (id bigint, embedding vector);"
                     " CREATE RULE log_vectors AS ON UPDATE TO docs DO ALSO"
                     " INSERT INTO vector_log VALUES (NEW.id, NEW.embedding)")
    stack.start_worker()
    result = stack.cli("tick", "--wait", "--timeout", "60")
    assert result.returncode == 0, result.stdout + result.stderr
    assert_all_current(stack)
    with stack.connect() as conn:
        logged = conn.execute("SELECT count(DISTINCT id) FROM vector_log"
                              " WHERE embedding IS NOT NULL").fetchone()
    assert logged == (40,)


def test_worker_processes_warm_up_before_their_first_message(stack: Stack, fake_openai
                                                            ) -> None:
    """Each process opens its pool at boot (and loads its provider) without any request."""
    init(stack)
    stack.start_worker(processes=2)

    def worker_connections() -> int:
        with stack.connect() as conn:
            return conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name ="
                " 'pgreembed-worker' AND datname = current_database()").fetchone()[0]

    wait_for(lambda: worker_connections() >= 2, timeout=60,
             message="both worker processes to open their pools at boot")
    assert fake_openai.stats()["requests"] == 0, "warm-up must not call the provider"
    assert "warm-up skipped" not in stack.log_text()


def test_changed_text_is_reembedded_and_unrelated_change_is_not(stack: Stack, fake_openai
                                                                ) -> None:
    seed(stack, 10, body="body of ")
    init(stack)
    stack.start_worker()
    assert stack.cli("tick", "--wait").returncode == 0
    calls_before = fake_openai.stats()["inputs_embedded"]
    with stack.connect() as conn:
        conn.execute("UPDATE docs SET views = views + 1")  # unrelated column
        conn.execute("UPDATE docs SET title = 'renamed' WHERE id = 3")
        conn.execute("UPDATE docs SET body = body WHERE id = 4")  # same text: no change
    result = stack.cli("tick", "--wait")
    assert result.returncode == 0
    assert (1,) in counts(r"enqueued (\d+) rows", result.stdout), result.stdout
    assert fake_openai.stats()["inputs_embedded"] == calls_before + 1
    assert_all_current(stack)


def test_text_changed_while_in_flight_ends_with_new_texts_vector(stack: Stack, fake_openai
                                                                  ) -> None:
    seed(stack, 8, body="body of ")
    init(stack)
    fake_openai.set_faults(latency=2.0)
    stack.start_worker()
    assert stack.cli("tick").returncode == 0  # enqueue; the provider answers in 2 s
    wait_for(lambda: fake_openai.stats()["requests"] >= 1, timeout=30,
             message="the worker's request")
    with stack.connect() as conn:
        conn.execute("UPDATE docs SET body = 'changed while in flight' WHERE id = 5")
    fake_openai.set_faults(latency=0.0)
    result = stack.cli("tick", "--wait", "--timeout", "60")
    assert result.returncode == 0, result.stdout + result.stderr
    assert_all_current(stack)
    counts = fake_openai.stats()["text_counts"]
    assert counts["doc 5\nchanged while in flight"] == 1


def test_duplicate_enqueue_does_not_double_provider_calls(stack: Stack, fake_openai) -> None:
    seed(stack, 30, body="body of ")
    init(stack)
    # 4 batches on 2 threads at 5 s each: the second tick (a new process, ~1 s to start on
    # a loaded machine) runs while every row is still in flight.
    fake_openai.set_faults(latency=5.0)
    stack.start_worker(threads=2)
    first = stack.cli("tick")
    second = stack.cli("tick")  # everything is still in flight
    assert counts(r"^tick: enqueued (\d+) rows in (\d+) batches", first.stdout) == [(30, 4)], (
        first.stdout)
    # Nothing enqueued again: each row is in flight, or (a very slow start) already done.
    assert counts(r"^tick: enqueued (\d+) rows in (\d+) batches", second.stdout) == [(0, 0)], (
        second.stdout)
    assert stack.cli("tick", "--wait", "--timeout", "60").returncode == 0
    sent = fake_openai.stats()["text_counts"]
    assert len(sent) == 30
    assert set(sent.values()) == {1}, sent
    assert_all_current(stack)


def test_tick_sends_whole_batches(stack: Stack) -> None:
    """Pages of pending keys are whole batches: 1100 rows in batches of 300 are
    300 + 300 + 300 + 200, not 300 + 300 + 300 + 100 + 100 (pages of 1000)."""
    stack.config_path.write_text(docs_config(batch_size=300))
    seed(stack, 1100, body="body of ")
    init(stack)
    tick = stack.cli("tick").stdout
    assert counts(r"enqueued (\d+) rows in (\d+) batches", tick) == [(1100, 4)], tick


def test_tick_exit_codes(stack: Stack, tmp_path) -> None:
    init(stack)
    assert stack.cli("tick").returncode == 0
    bad = tmp_path / "bad.toml"
    bad.write_text('[[target]]\nname = "docs"\ntable = "docs"\ntext_column = "title"\n'
                   'vector_column = "embedding"\ndimensions = "many"\n')
    result = stack.cli("--config", str(bad), "tick")
    assert result.returncode == 2
    assert "dimensions" in result.stderr and "integer" in result.stderr
    env_without_db = dict(stack.env, DATABASE_URL="postgresql://app:hunter2secret@127.0.0.1:1/x")
    stack.env, saved = env_without_db, stack.env
    try:
        result = stack.cli("tick")
    finally:
        stack.env = saved
    assert result.returncode == 1
    assert "hunter2secret" not in result.stderr + result.stdout
    assert "cannot connect" in result.stderr


def test_continuous_scheduler_picks_up_inserts_within_seconds(stack: Stack) -> None:
    init(stack)
    stack.start_worker()
    stack.start_scheduler()
    stack.start_scheduler()  # a second replica must not double the work
    wait_for(lambda: "this scheduler is now the leader" in stack.log_text()
             and "Worker process is ready for action" in stack.log_text(), timeout=60,
             message="a scheduler leading and the worker ready")
    latencies = []
    for i in range(5):
        with stack.connect() as conn:
            key = conn.execute("INSERT INTO docs (title, body) VALUES (%s, 'fresh')"
                               " RETURNING id", (f"fresh {i}",)).fetchone()[0]
        start = time.monotonic()

        def embedded(key: int = key) -> bool:
            with stack.connect() as conn:
                return bool(conn.execute("SELECT embedding IS NOT NULL FROM docs WHERE id = %s",
                                         (key,)).fetchone()[0])

        wait_for(embedded, timeout=10, interval=0.02, message=f"row {key}")
        latencies.append(time.monotonic() - start)
    assert max(latencies) < 3.0, latencies
    assert_all_current(stack)
    assert stack.log_text().count("this scheduler is now the leader") == 1


@pytest.mark.parametrize("threads", [4])
def test_bad_rows_are_recorded_and_do_not_block_others(stack: Stack, fake_openai,
                                                       threads: int) -> None:
    seed(stack, rows=[(None, None), ("", "   "), ("poison", "BADINPUT here"), ("good", "one"),
                      ("good", "two")])
    fake_openai.set_faults(bad_input_marker="BADINPUT")
    init(stack)
    stack.start_worker(threads=threads)
    result = stack.cli("tick", "--wait", "--timeout", "60")
    assert result.returncode == 0, result.stdout + result.stderr
    with stack.connect() as conn:
        good = conn.execute("SELECT count(*) FROM docs WHERE title = 'good'"
                            " AND embedding IS NOT NULL").fetchone()[0]
    assert good == 2
    failures = stack.cli("failures", "--target", "docs")
    assert failures.returncode == 0
    # concat_ws of two NULLs is '', so row 1 is "empty" too
    assert "row 1: text is empty or only whitespace" in failures.stdout
    assert "row 2: text is empty or only whitespace" in failures.stdout
    assert "row 3: provider rejected the text" in failures.stdout
    status = stack.cli("status", "--json")
    assert [s["failed"] for s in json_document(status.stdout)["columns"]] == [3]
    # Failed rows are not retried on every pass ...
    tick = stack.cli("tick").stdout
    assert counts(r"enqueued (\d+) rows", tick) == [(0,)], tick
    # ... until asked to, or until their text changes.
    with stack.connect() as conn:
        conn.execute("UPDATE docs SET body = 'fixed' WHERE id = 3")
    fake_openai.set_faults(bad_input_marker=None)
    assert stack.cli("tick", "--wait").returncode == 0
    with stack.connect() as conn:
        assert conn.execute("SELECT embedding IS NOT NULL FROM docs WHERE id = 3"
                            ).fetchone()[0]
    assert "sk-test" not in stack.log_text()


def test_provider_down_past_every_in_process_retry_then_work_resumes(stack: Stack,
                                                                     fake_openai) -> None:
    """The provider answers only 500s for longer than a batch retries in-process: the
    message goes to Dramatiq's retries, no row is marked failed, and once the provider
    is back every row is embedded without anyone stepping in."""
    stack.config_path.write_text(docs_config(worker_extra="provider_retry_seconds = 2"))
    seed(stack, 30, body="body of ")
    init(stack)
    fake_openai.set_faults(error_500_count=10**6)  # every request fails: the provider is down
    stack.start_worker(threads=2)
    stack.start_scheduler()
    wait_for(lambda: "Retrying message" in stack.log_text(), timeout=60,
             message="a batch to give up in-process and go to Dramatiq's retries")
    time.sleep(4.0)  # the scenario: the provider stays down a while longer
    with stack.connect() as conn:
        assert conn.execute("SELECT count(*) FROM docs WHERE embedding IS NOT NULL"
                            ).fetchone()[0] == 0
    status = json_document(stack.cli("status", "--json").stdout)["columns"]
    assert [s["failed"] for s in status] == [0]  # transient, not bad rows
    fake_openai.set_faults(error_500_count=0)  # the provider is back

    def all_embedded() -> bool:
        with stack.connect() as conn:
            return conn.execute("SELECT count(*) FROM docs WHERE embedding IS NULL"
                                ).fetchone()[0] == 0
    wait_for(all_embedded, timeout=90, interval=0.5, message="every row after the outage")
    assert_all_current(stack)
    assert fake_openai.stats()["status_counts"].get("500", 0) >= 3


def test_a_target_added_after_the_workers_started_needs_no_worker_restart(stack: Stack
                                                                          ) -> None:
    """The config gains a target, `init` and a `tick` run with it; the worker started with
    the old config re-reads it for the new target's messages (before: "unknown target",
    retried until the worker was restarted)."""
    seed(stack, 5)
    init(stack)
    worker = stack.start_worker()
    with stack.connect() as conn:
        wait_for(lambda: conn.execute(  # booted: its pool is open, its config read
            "SELECT count(*) FROM pg_stat_activity WHERE application_name ="
            " 'pgreembed-worker' AND datname = current_database()").fetchone()[0] >= 1,
            timeout=60, message="the worker to boot with the first config")
        conn.execute("CREATE TABLE notes (id bigserial PRIMARY KEY, note text, embedding"
                     " vector(384))")
        conn.execute("INSERT INTO notes (note) SELECT 'note ' || g FROM generate_series(1, 12) g")
    stack.config_path.write_text(docs_config() + """
[[target]]
name = "notes"
table = "public.notes"
text_column = "note"
vector_column = "embedding"
provider = "openai"
model = "fake-384"
dimensions = 384
batch_size = 8
""")
    init(stack)
    result = stack.cli("tick", "--wait", "--timeout", "60")
    assert result.returncode == 0, result.stdout + result.stderr
    assert worker.poll() is None, "the worker was not restarted"
    with stack.connect() as conn:
        notes = conn.execute("SELECT id, note, embedding FROM notes ORDER BY id").fetchall()
    for key, text, vector in notes:
        assert vector is not None, f"notes row {key} has no vector"
        np.testing.assert_allclose(vector.to_numpy(), fake_vector(MODEL, text, 384), atol=1e-6)
    assert "was added to the config" in stack.log_text()
