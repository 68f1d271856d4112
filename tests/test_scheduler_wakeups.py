"""A burst of NOTIFYs wakes the scheduler without flooding its log, and loses no row."""

from __future__ import annotations

import json
import signal
import time

from pgreembed.testing.fake_openai import FakeOpenAIServer
from tests.helpers import Stack, docs_config, wait_for

ROWS = 1500


def scheduler_records(stack: Stack) -> list[dict[str, object]]:
    text = (stack.logs / "scheduler.log").read_text(errors="replace")
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_notify_burst_is_coalesced(stack: Stack) -> None:
    stack.env["PGREEMBED_LOG_FORMAT"] = "json"
    assert stack.cli("init").returncode == 0
    stack.start_worker(processes=1, threads=2)
    scheduler = stack.start_scheduler()
    wait_for(lambda: any(r["message"] == "this scheduler is now the leader"
                         for r in scheduler_records(stack)), timeout=30, message="a leader")
    started = time.monotonic()
    with stack.connect() as conn:
        for i in range(ROWS):  # one statement, one NOTIFY each
            conn.execute("INSERT INTO docs (title, body) VALUES (%s, 'burst')", (f"row {i}",))
    burst_seconds = time.monotonic() - started

    def all_embedded() -> bool:
        with stack.connect() as conn:
            row = conn.execute("SELECT count(*) FROM docs WHERE embedding IS NULL").fetchone()
            return row is not None and row[0] == 0

    wait_for(all_embedded, timeout=120, interval=0.2, message=f"the {ROWS} rows embedded")
    scheduler.send_signal(signal.SIGTERM)
    scheduler.wait(30)
    warnings = [r for r in scheduler_records(stack) if r["level"] in ("WARNING", "ERROR")]
    assert warnings == [], (f"{len(warnings)} warnings during a {burst_seconds:.1f} s burst of"
                            f" {ROWS} NOTIFYs, first: {warnings[:3]}")


def test_a_steady_stream_goes_out_in_batches_not_one_row_requests(
        stack: Stack, fake_openai: FakeOpenAIServer) -> None:
    """40 inserts/s, each with its NOTIFY: the scheduler lingers a moment after a wake-up
    (`linger_seconds`, 0.25 s by default), so the provider sees batches of several rows,
    not a request per row (2.1 rows per request before the linger)."""
    stack.config_path.write_text(docs_config(batch_size=64))
    assert stack.cli("init").returncode == 0
    stack.start_worker(processes=1, threads=2)
    stack.start_scheduler()
    with stack.connect() as conn:
        conn.execute("INSERT INTO docs (title, body) VALUES ('warm', 'up')")
    wait_for(lambda: fake_openai.stats()["inputs_embedded"] == 1, timeout=60,
             message="the first row embedded")
    fake_openai.reset()
    started = time.monotonic()
    with stack.connect() as conn:
        for i in range(200):  # ~5 s of a pipeline inserting 40 rows/s
            conn.execute("INSERT INTO docs (title, body) VALUES (%s, 'stream')", (f"row {i}",))
            time.sleep(0.025)  # the app's pace: a steady stream of inserts
    rate = 200 / (time.monotonic() - started)
    wait_for(lambda: fake_openai.stats()["inputs_embedded"] >= 200, timeout=60,
             message="the 200 rows embedded")
    stats = fake_openai.stats()
    per_request = stats["inputs_embedded"] / stats["requests"]
    print(f"\n200 rows at {rate:.0f}/s: {stats['requests']} requests,"
          f" {per_request:.1f} rows each")
    assert per_request >= 4, f"{stats['requests']} requests for 200 rows"
