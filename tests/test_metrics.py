"""Prometheus metrics from a real worker (Dramatiq multiprocess) and the scheduler."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import Stack, seed, wait_for
from tests.observability import samples, scrape, start_exporters, value


def test_worker_and_scheduler_metrics(stack: Stack, tmp_path: Path) -> None:
    worker_port, scheduler_port = start_exporters(stack.env, tmp_path)
    seed(stack, 20, body="body", numbered_body=False, rows=[("", "")])  # and one failure
    assert stack.cli("init").returncode == 0
    stack.start_worker(processes=2, threads=2)
    stack.start_scheduler()

    def all_done() -> bool:
        return value(samples(scrape(scheduler_port)), "pgreembed_rows", state="embedded") == 20.0

    try:
        wait_for(all_done, timeout=60, interval=0.5, message="scheduler metrics to show 20 rows")
    finally:
        print(stack.log_text()[-4000:], scrape(scheduler_port)[-2000:])
    scheduler = samples(scrape(scheduler_port))
    assert value(scheduler, "pgreembed_rows", state="failed") == 1.0
    assert value(scheduler, "pgreembed_rows", state="pending") == 0.0
    assert (value(scheduler, "pgreembed_slot_tokens_total") or 0) > 0

    def worker_counted() -> dict[str, list[tuple[dict[str, str], float]]] | None:
        parsed = samples(scrape(worker_port))
        return parsed if value(parsed, "pgreembed_rows_embedded_total", target="docs") == 20.0 \
            else None

    worker = wait_for(worker_counted, timeout=30, interval=0.5, message="worker metrics")
    assert value(worker, "pgreembed_row_failures_total", reason="empty") == 1.0
    assert (value(worker, "pgreembed_tokens_total") or 0) > 0
    assert value(worker, "dramatiq_messages_total", actor_name="embed_batch")
