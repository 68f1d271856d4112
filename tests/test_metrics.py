"""Prometheus metrics from a real worker (Dramatiq multiprocess) and the scheduler."""

from __future__ import annotations

import urllib.request
from pathlib import Path

from pgreembed.testing.services import free_port
from tests.helpers import Stack, wait_for


def scrape(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return str(response.read().decode())
    except OSError:
        return ""


def value(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_worker_and_scheduler_metrics(stack: Stack, tmp_path: Path) -> None:
    worker_port, scheduler_port = free_port(), free_port()
    prom_dir = tmp_path / "prom"
    prom_dir.mkdir()
    stack.env.update({"dramatiq_prom_port": str(worker_port), "dramatiq_prom_host": "127.0.0.1",
                      "dramatiq_prom_db": str(prom_dir),
                      "PGREEMBED_SCHEDULER_METRICS_PORT": str(scheduler_port),
                      "PGREEMBED_METRICS_HOST": "127.0.0.1"})
    with stack.connect() as conn:
        conn.execute("INSERT INTO docs (title, body) SELECT 'doc ' || g, 'body'"
                     " FROM generate_series(1, 20) g")
        conn.execute("INSERT INTO docs (title, body) VALUES ('', '')")
    assert stack.cli("init").returncode == 0
    stack.start_worker(processes=2, threads=2)
    stack.start_scheduler()

    def all_done() -> bool:
        text = scrape(scheduler_port)
        return value(text, "pgreembed_rows", state="embedded") == 20.0

    try:
        wait_for(all_done, timeout=60, interval=0.5, message="scheduler metrics to show 20 rows")
    finally:
        print(stack.log_text()[-4000:], scrape(scheduler_port)[-2000:])
    scheduler = scrape(scheduler_port)
    assert value(scheduler, "pgreembed_rows", state="failed") == 1.0
    assert value(scheduler, "pgreembed_rows", state="pending") == 0.0
    assert (value(scheduler, "pgreembed_slot_tokens_total") or 0) > 0

    def worker_counted() -> str | None:
        text = scrape(worker_port)
        return text if value(text, "pgreembed_rows_embedded_total", target="docs") == 20.0 \
            else None

    worker = wait_for(worker_counted, timeout=30, interval=0.5, message="worker metrics")
    assert value(worker, "pgreembed_row_failures_total", reason="empty") == 1.0
    assert (value(worker, "pgreembed_tokens_total") or 0) > 0
    assert value(worker, "dramatiq_messages_total", actor_name="embed_batch")
