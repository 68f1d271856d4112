"""Migration through the Batch API, against the local server's files/batches endpoints."""

from __future__ import annotations

import threading
import time

from tests.helpers import (
    BATCH_LINE,
    Stack,
    assert_column_current,
    counts,
    in_background,
    json_document,
    migrate,
    running,
    seed,
    start_migration,
    wait_filled,
    wait_for,
)


def null_count(stack: Stack, column: str) -> int:
    with stack.connect() as conn:
        return int(conn.execute(f"SELECT count(*) FROM docs WHERE {column} IS NULL"
                                ).fetchone()[0])


def watch_idle_in_transaction(stack: Stack, stop: threading.Event,
                              seen: list[tuple[object, ...]]) -> None:
    """Collect pgreembed sessions idle in a transaction for over a second until `stop`."""
    with stack.connect() as conn:
        while not stop.is_set():
            seen.extend(conn.execute(
                "SELECT pid, query FROM pg_stat_activity WHERE state = 'idle in transaction'"
                " AND application_name LIKE 'pgreembed%%'"
                " AND state_change < now() - interval '1 second'").fetchall())
            stop.wait(0.2)


def test_batch_api_fills_new_column_and_hands_stragglers_to_the_queue(stack: Stack,
                                                                      fake_openai) -> None:
    seed(stack, 40, rows=[("poison", "BADINPUT row")])
    running(stack)
    wait_filled(stack, "embedding")
    fake_openai.set_faults(batch_delay=2.0, bad_input_marker="BADINPUT")
    column = start_migration(stack, "--model", "fake-768", "--dimensions", "768", "--batch-api")
    first = migrate(stack, "batch")
    # (submitted, jobs completed, rows written, failed, open)
    assert counts(BATCH_LINE, first) == [(41, 0, 0, 0, 1)], first
    time.sleep(1.0)  # the scenario: a while (two scheduler polls) the queue must not fill it
    assert null_count(stack, column) == 41  # the queue leaves a batch-mode column alone
    with stack.connect() as conn:  # edited while its batch runs: that vector must not land
        conn.execute("UPDATE docs SET body = 'edited during the batch' WHERE id = 4")
    # Collecting downloads the output, error and input files (hundreds of MB for a full
    # job): no pgreembed session may sit idle in a transaction meanwhile, or Postgres ends
    # it at our idle-in-transaction limit and the paid results are never written.
    fake_openai.set_faults(file_content_delay=1.5)
    idle: list[tuple[object, ...]] = []
    with in_background(lambda stop: watch_idle_in_transaction(stack, stop, idle)):
        done = migrate(stack, "batch", "--wait", "--poll", "0.5", "--timeout", "60")
    assert idle == [], idle
    # The job recorded the model it asked for: its input file is not downloaded again.
    assert fake_openai.stats()["file_downloads"] == {"batch_output": 2}
    fake_openai.set_faults(file_content_delay=0.0)
    assert [c[1:4] for c in counts(BATCH_LINE, done)] == [(1, 39, 1)], done
    failures = json_document(stack.cli("failures", "--target", "docs", "--json").stdout
                             )["failures"]
    assert [(f["column"], f["role"], f["key"]) for f in failures] == [(column, "next", "41")]
    assert failures[0]["reason"].startswith("batch API rejected it")  # the live column: none
    assert "remaining rows go through the normal queue" in done
    fake_openai.set_faults(bad_input_marker=None)
    with stack.connect() as conn:  # the poison row's text is fixed; now it can be embedded
        conn.execute("UPDATE docs SET body = 'cured' WHERE title = 'poison'")
    wait_filled(stack, column)
    assert_column_current(stack, column, "fake-768", 768)
    assert json_document(migrate(stack, "status", "--json"))["done"] == 41

    def batch_texts_once() -> bool:
        counts = fake_openai.stats()["text_counts"]
        return counts.get("doc 4\nedited during the batch", 0) >= 1
    wait_for(batch_texts_once, timeout=10, message="the edited row re-embedded by the queue")
