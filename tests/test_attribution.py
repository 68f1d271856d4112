"""Invariant 8 on real services: a fault of the database or of the config is not a row's.

- A row the app's table refuses (a CHECK on the vector column, a trigger that
  raises) is recorded failed with the database's message; its neighbours are
  written, and nothing is embedded twice (before: the whole batch failed, every
  Dramatiq retry re-embedded it, nothing was recorded).
- A database-wide write error (disk full, SQLSTATE 53100) pauses the write; the
  vectors are written once it passes, none bought twice, no row marked failed.
  The error is raised by a trigger of the app's table while a flag table says
  so: the worker sees exactly what a full disk gives it (an error of that SQLSTATE
  from its UPDATE), switched on and off at a chosen moment without filling a disk.
- A config the provider refuses whatever the rows (`dimensions` over the model's
  maximum, a model answering another size) marks the column misconfigured: no row
  failed, nothing more sent, `tick` exits 4, status/doctor/metrics say why, and
  `pgreembed init` clears it.
"""

from __future__ import annotations

import time
from typing import Any

import redis

from pgreembed.config import load_settings
from tests.helpers import OUTAGE_TRIGGER, Stack, docs_config, json_document, seed, wait_for


def embedded_count(stack: Stack) -> int:
    with stack.connect() as conn:
        return int(conn.execute("SELECT count(embedding) FROM docs").fetchone()[0])


def cli_json(stack: Stack, *args: str) -> Any:
    result = stack.cli(*args, "--json")
    assert result.returncode in (0, 1), result.stdout + result.stderr
    doc = json_document(result.stdout)
    return doc["failures"] if args[0] == "failures" else doc["columns"]


def failures(stack: Stack) -> dict[str, str]:
    return {r["key"]: r["reason"] for r in cli_json(stack, "failures", "--target", "docs")}


def assert_each_text_embedded_once(fake_openai: Any, rows: int) -> None:
    stats = fake_openai.stats()
    counts: dict[str, int] = stats["text_counts"]
    assert len(counts) == rows, stats
    assert stats["inputs_embedded"] == rows, f"re-embedded: {stats}"


def set_outage(stack: Stack, on: bool) -> None:
    with stack.connect() as conn:
        conn.execute("UPDATE write_outage SET disk_full = %s", (on,))


def test_rows_the_table_refuses_fail_alone_with_the_databases_message(stack: Stack,
                                                                      fake_openai) -> None:
    seed(stack, 40, body="body of ")
    assert stack.cli("init").returncode == 0
    with stack.connect() as conn:  # the app's own rules, met only when a vector is set
        conn.execute("ALTER TABLE docs ADD CONSTRAINT no_vector_for_3s"
                     " CHECK (embedding IS NULL OR id % 10 <> 3)")
        conn.execute("""
            CREATE FUNCTION frozen() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.embedding IS NOT NULL AND NEW.id % 10 = 7 THEN
                    RAISE EXCEPTION 'row % is frozen by the app', NEW.id;
                END IF;
                RETURN NEW;
            END $$""")
        conn.execute("CREATE TRIGGER app_frozen BEFORE UPDATE ON docs FOR EACH ROW"
                     " EXECUTE FUNCTION frozen()")
    stack.start_worker(threads=2)
    result = stack.cli("tick", "--wait", "--timeout", "60")
    assert result.returncode == 0, result.stdout + result.stderr

    found = failures(stack)
    assert set(found) == {str(i) for i in range(1, 41) if i % 10 in (3, 7)}
    for key, reason in found.items():
        if int(key) % 10 == 3:
            assert reason == ('database rejected the write: new row for relation "docs"'
                              ' violates check constraint "no_vector_for_3s" (SQLSTATE 23514)')
        else:
            assert reason == (f"database rejected the write: row {key} is frozen by the app"
                              " (SQLSTATE P0001)")
    assert embedded_count(stack) == 32
    assert_each_text_embedded_once(fake_openai, 40)
    status = cli_json(stack, "status")
    assert [(s["failed"], s["pending"], s["misconfigured"]) for s in status] == [(8, 0, None)]


def test_disk_full_pauses_the_write_and_buys_nothing_twice(stack: Stack, fake_openai) -> None:
    seed(stack, 24, body="body of ")
    assert stack.cli("init").returncode == 0
    with stack.connect() as conn:
        conn.execute(OUTAGE_TRIGGER)
    set_outage(stack, True)
    stack.start_worker(threads=4)  # each of the 3 batches pauses in a thread of its own
    assert stack.cli("tick").returncode == 0
    wait_for(lambda: fake_openai.stats()["inputs_embedded"] >= 24, timeout=30,
             message="every row embedded by the provider")
    time.sleep(3)  # the full disk lasts a few seconds: the writes wait, nothing is re-bought
    assert embedded_count(stack) == 0
    set_outage(stack, False)
    wait_for(lambda: embedded_count(stack) == 24, timeout=30,
             message="the paused writes to land once the disk has room")
    assert_each_text_embedded_once(fake_openai, 24)
    assert failures(stack) == {}


def test_vectors_outlive_a_write_that_fails_past_its_retries(stack: Stack, fake_openai
                                                             ) -> None:
    """After `write_retry_seconds` the message goes back to Dramatiq: its retry writes the
    vectors kept in Redis instead of buying them again."""
    stack.config_path.write_text(docs_config(worker_extra="write_retry_seconds = 0.5"))
    seed(stack, 16, body="body of ")
    assert stack.cli("init").returncode == 0
    with stack.connect() as conn:
        conn.execute(OUTAGE_TRIGGER)
    set_outage(stack, True)
    stack.start_worker(threads=2)
    assert stack.cli("tick").returncode == 0
    client = redis.Redis.from_url(stack.redis_url)
    wait_for(lambda: len(client.keys("pgreembed:paid:*")) == 16, timeout=30,
             message="the vectors of the failed writes kept in Redis")
    assert 0 < client.ttl(client.keys("pgreembed:paid:*")[0]) <= 3600
    set_outage(stack, False)
    wait_for(lambda: embedded_count(stack) == 16, timeout=60,
             message="Dramatiq's retries to write the kept vectors")
    assert_each_text_embedded_once(fake_openai, 16)
    assert failures(stack) == {}
    wait_for(lambda: client.keys("pgreembed:paid:*") == [], timeout=10,
             message="kept vectors forgotten once written")
    with stack.connect() as conn:  # the tokens billed before the outage are on the ledger
        tokens = conn.execute("SELECT sum(tokens) FROM pgreembed.usage").fetchone()[0]
    assert tokens == fake_openai.stats()["tokens_embedded"]


def misconfigured_config(model: str, dimensions: int) -> str:
    return docs_config(batch_size=8, max_inflight_rows=256).replace(
        'model = "fake-384"\ndimensions = 384', f'model = "{model}"\ndimensions = {dimensions}')


def test_dimensions_over_the_models_maximum_mark_the_column_misconfigured(
        stack: Stack, fake_openai) -> None:
    # The case: every request is a 400, which was split down to single rows.
    stack.config_path.write_text(misconfigured_config("text-embedding-3-small", 2000))
    seed(stack, 256, body="body of ")
    assert stack.cli("init").returncode == 0
    stack.start_worker(threads=2)
    result = stack.cli("tick", "--wait", "--timeout", "60")
    assert result.returncode == 4, result.stdout + result.stderr
    assert "column embedding (openai:text-embedding-3-small@2000) is misconfigured" in (
        result.stderr)
    assert "Invalid 'dimensions': must be an integer between 1 and 1536." in result.stderr
    stats = fake_openai.stats()
    # A request and its probe per batch that was already running (2 threads), not 508.
    assert stats["status_counts"] == {"400": stats["requests"]} and stats["requests"] <= 8
    assert failures(stack) == {}

    status = cli_json(stack, "status")
    assert len(status) == 1 and status[0]["pending"] == 256 and status[0]["failed"] == 0
    assert "Invalid 'dimensions'" in status[0]["misconfigured"]
    text = stack.cli("status").stdout
    assert "MISCONFIGURED docs.embedding (openai:text-embedding-3-small@2000)" in text
    doctor = stack.cli("doctor", "--json")
    assert doctor.returncode == 1
    found = [f for f in json_document(doctor.stdout)["findings"]
             if f["check"] == "misconfigured"]
    assert [(f["level"], f["details"]["column"]) for f in found] == [("error", "embedding")]

    from pgreembed.observability.scheduler_metrics import DatabaseCollector

    settings = load_settings(stack.config_path, env=stack.env)
    gauges = {m.name: m for m in DatabaseCollector(settings).collect()}
    assert [s.value for s in gauges["pgreembed_slot_misconfigured"].samples] == [1.0]

    # Nothing more is sent for it until an operator clears the mark.
    requests = fake_openai.stats()["requests"]
    assert stack.cli("tick", "--wait", "--timeout", "30").returncode == 4
    assert fake_openai.stats()["requests"] == requests
    assert stack.cli("init").returncode == 0
    assert cli_json(stack, "status")[0]["misconfigured"] is None
    assert stack.cli("tick", "--wait", "--timeout", "60").returncode == 4  # still wrong
    assert fake_openai.stats()["requests"] > requests


def test_a_model_answering_other_dimensions_marks_the_column_until_init(
        stack: Stack, fake_openai) -> None:
    stack.config_path.write_text(misconfigured_config("fake-384", 384))
    seed(stack, 64, body="body of ")
    assert stack.cli("init").returncode == 0
    fake_openai.set_faults(wrong_dims_count=1000)  # the server answers 385 dimensions
    stack.start_worker(threads=2)
    result = stack.cli("tick", "--wait", "--timeout", "60")
    assert result.returncode == 4, result.stdout + result.stderr
    assert "the model returns 385 dimensions, the column holds 384" in result.stderr
    assert failures(stack) == {}
    assert cli_json(stack, "status")[0]["pending"] == 64

    fake_openai.set_faults(wrong_dims_count=0)  # the model is fixed
    assert stack.cli("init").returncode == 0
    result = stack.cli("tick", "--wait", "--timeout", "60")
    assert result.returncode == 0, result.stdout + result.stderr
    assert embedded_count(stack) == 64 and failures(stack) == {}


def test_a_single_bad_row_is_still_the_rows_fault(stack: Stack, fake_openai) -> None:
    """The probe passes, so a 400 for one input is split down to that row, as before."""
    stack.config_path.write_text(misconfigured_config("fake-384", 384))
    seed(stack, 16, body="body of ")
    with stack.connect() as conn:
        conn.execute("UPDATE docs SET body = 'POISON' WHERE id = 5")
    assert stack.cli("init").returncode == 0
    fake_openai.set_faults(bad_input_marker="POISON")
    stack.start_worker(threads=2)
    result = stack.cli("tick", "--wait", "--timeout", "60")
    assert result.returncode == 0, result.stdout + result.stderr
    assert list(failures(stack)) == ["5"]
    assert embedded_count(stack) == 15
