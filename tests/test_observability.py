"""Every documented metric is really emitted, after real traffic with injected faults.

A real worker fleet (Dramatiq's exporter, multiprocess) and the real scheduler run
against the fake provider answering 500s and 429s; both /metrics endpoints are scraped
and parsed, and every metric of docs/operations.md's reference must be there with its labels.
"""

from __future__ import annotations

import time
from pathlib import Path

import redis

from pgreembed.queue.claims import InFlight
from pgreembed.queue.freshness import oldest_pending_seconds, record_complete_sweep
from pgreembed.testing.fake_openai import FakeOpenAIServer
from tests.helpers import Stack, seed, start_migration, wait_for
from tests.observability import (
    PROMETHEUS_OWN,
    base_name,
    deploy_queries,
    documented_metrics,
    emitted,
    samples,
    scrape,
    start_exporters,
    total,
)

ROWS = 40
MODEL = "openai:fake-384@384"


def test_every_documented_metric_is_emitted(stack: Stack, fake_openai: FakeOpenAIServer,
                                            tmp_path: Path) -> None:
    documented = documented_metrics()
    assert len(documented) >= 15, "the metrics reference of docs/operations.md was not found"
    worker_port, scheduler_port = start_exporters(stack.env, tmp_path)
    seed(stack, ROWS, body="body", numbered_body=False, rows=[("", "")])  # and one failure
    # A cap far above this test's pace, so that the throttle's gauges exist.
    stack.config_path.write_text(stack.config_path.read_text()
                                 + "\n[throttle]\nmax_rows_per_second = 100000\n")
    assert stack.cli("init").returncode == 0
    stack.start_scheduler()

    # No worker yet: the rows are claimed and wait, and the gauges say so.
    def waiting() -> dict | None:  # type: ignore[type-arg]
        parsed = samples(scrape(scheduler_port))
        age = total(parsed, "pgreembed_oldest_pending_seconds", role="live")
        return parsed if age >= 1.0 else None

    parsed = wait_for(waiting, timeout=60, interval=0.5, message="oldest pending age > 1 s")
    assert total(parsed, "pgreembed_rows", state="pending") == ROWS + 1
    assert total(parsed, "pgreembed_coverage_ratio", role="live") == 0.0

    fake_openai.set_faults(error_500_count=3, rate_limit_count=2, rate_limit_retry_after=0.2)
    stack.start_worker(processes=2, threads=2)

    def live_done() -> bool:
        found = samples(scrape(scheduler_port))
        return total(found, "pgreembed_rows", role="live", state="embedded") == ROWS

    wait_for(live_done, timeout=90, interval=0.5, message="the live column embedded")
    # A migration with a spend cap: the `next` column and the spend gauges.
    start_migration(stack, "--model", "text-embedding-3-small", "--dimensions", "384",
                    "--spend-cap", "5")

    def everything() -> tuple[dict, dict] | None:  # type: ignore[type-arg]
        scheduler = samples(scrape(scheduler_port))
        worker = samples(scrape(worker_port))
        if total(scheduler, "pgreembed_rows", role="next", state="embedded") != ROWS:
            return None
        if total(worker, "pgreembed_rows_embedded_total") != 2 * ROWS:
            return None
        return scheduler, worker

    try:
        scheduler, worker = wait_for(everything, timeout=90, interval=0.5,
                                     message="both columns embedded and counted")
    finally:
        print(stack.log_text()[-3000:])

    for name, doc in documented.items():
        if name.startswith("pgreembed_chunking"):
            continue  # chunked targets only: scraped on one in tests/test_chunk_counts.py
        found = emitted(scheduler if doc.source == "scheduler" else worker, name)
        assert found, f"{name} is documented but the {doc.source} never emitted it"
        labels = {k for series, _ in found for k in series} - {"le"}
        assert labels == doc.labels, f"{name}: emitted labels {labels}, documented {doc.labels}"

    # What deploy/'s alerts and dashboard query is what the exporters really emitted.
    emitted_names = {n for n in (*scheduler, *worker)}
    for where, names in deploy_queries().items():
        for name in names - PROMETHEUS_OWN:
            assert name in emitted_names or any(
                base_name(e, {name}) for e in emitted_names), f"{where}: {name} never emitted"

    # The faults are counted where they happened, per model and status.
    assert total(worker, "pgreembed_provider_errors_total", model=MODEL, status="500") == 3
    assert total(worker, "pgreembed_provider_errors_total", model=MODEL, status="429") == 2
    requests = fake_openai.stats()["requests"]
    assert total(worker, "pgreembed_provider_request_seconds_count") == requests
    assert total(worker, "pgreembed_embed_lag_seconds_count") == 2 * ROWS
    live = {"target": "docs", "column": "embedding", "role": "live"}
    assert total(scheduler, "pgreembed_coverage_ratio", **live) == ROWS / (ROWS + 1)
    assert total(scheduler, "pgreembed_oldest_pending_seconds", **live) == 0.0
    assert total(scheduler, "pgreembed_migration_spend_cap_usd", target="docs") == 5.0
    assert total(scheduler, "pgreembed_throttle_factor") == 1.0  # no back-off: not adaptive
    assert total(scheduler, "pgreembed_throttle_rows_per_second") == 100000.0


def test_oldest_pending_age_counts_claims_and_rows_not_claimed_yet(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    inflight = InFlight(client, 7, lease_seconds=3600)
    inflight.claim(["1", "2"])  # provisional: scored a lease back, must not count
    now = time.time()
    assert oldest_pending_seconds(client, 7, 3600, pending=2, in_flight=2, created_at=now,
                                  now=now) == 0.0
    inflight.confirm(["1", "2"])
    age = oldest_pending_seconds(client, 7, 3600, pending=2, in_flight=2, created_at=now - 99,
                                 now=now + 30)
    assert 29 < age < 32  # all pending rows are claimed: the oldest claim
    # More pending than in flight, never swept to the end: since the slot exists.
    assert oldest_pending_seconds(client, 7, 3600, pending=5, in_flight=2,
                                  created_at=now - 99, now=now) >= 99
    record_complete_sweep(client, 7, now - 10)
    age = oldest_pending_seconds(client, 7, 3600, pending=5, in_flight=2, created_at=now - 99,
                                 now=now + 30)
    assert 39 < age < 41  # since the last complete sweep began
    assert oldest_pending_seconds(client, 7, 3600, pending=0, in_flight=0, created_at=0) == 0


def test_alerts_and_dashboard_query_only_documented_metrics() -> None:
    """Fast check (the scrape above proves every documented metric is emitted, and
    test_every_documented_metric_is_emitted checks these names against the scrape too)."""
    documented = set(documented_metrics())
    queries = deploy_queries()
    assert len([q for q in queries if q.startswith("alert")]) >= 7
    for where, names in queries.items():
        assert names, f"{where}: no metric found in its expression"
        for name in names - PROMETHEUS_OWN:
            assert base_name(name, documented), f"{where}: {name} is not a documented metric"
    alerts = set(queries)
    for wanted in ("BacklogGrowing", "OldestPendingTooOld", "ProviderErrors", "RateLimited",
                   "SpendNearCap", "MigrationStalled", "WorkerDown"):
        assert f"alert Pgreembed{wanted}" in alerts
