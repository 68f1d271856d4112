"""A burst of NOTIFYs wakes the scheduler without flooding its log, and loses no row."""

from __future__ import annotations

import json
import signal
import time

from tests.helpers import Stack, wait_for

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
