"""The scheduler's Prometheus gauges, read from Postgres at scrape time.

Pending, embedded, failed, in flight, coverage, age of the oldest pending row, tokens
and cost so far, the throttle's pace: right even after restarts
(PGREEMBED_SCHEDULER_METRICS_PORT). They use the cheap counts of
`pgreembed.operations.status` (no scan of the app's table)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

from pgreembed.config import environment
from pgreembed.config.model_keys import parse_model_key
from pgreembed.observability.worker_metrics import SCHEDULER_PORT_ENV, require_prometheus

log = logging.getLogger(__name__)


class DatabaseCollector:
    """Gauges computed from Postgres when Prometheus scrapes the scheduler."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings

    def collect(self) -> Iterator[Any]:
        import redis
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        from pgreembed.embedding.throttle import observe
        from pgreembed.operations.chunk_status import chunking_status
        from pgreembed.operations.status import collect
        from pgreembed.queue.freshness import oldest_pending_seconds
        from pgreembed.store.pool import connect
        from pgreembed.store.slots import slots_created_at
        from pgreembed.store.usage import migration_spend, usage_by_model

        counts = GaugeMetricFamily("pgreembed_rows", "Rows per state (total and embedded are"
                                   " estimates from the table's row count).",
                                   labels=["target", "column", "role", "state"])
        coverage = GaugeMetricFamily("pgreembed_coverage_ratio",
                                     "Share of rows with a vector of the column's model.",
                                     labels=["target", "column", "role"])
        oldest = GaugeMetricFamily("pgreembed_oldest_pending_seconds",
                                   "Age of the oldest pending row (since its claim, or an"
                                   " upper bound for rows not claimed yet).",
                                   labels=["target", "column", "role"])
        tokens = CounterMetricFamily("pgreembed_slot_tokens", "Tokens sent, per column.",
                                     labels=["target", "column", "model"])
        cost = CounterMetricFamily("pgreembed_slot_cost_usd", "List-price cost, per column.",
                                   labels=["target", "column", "model"])
        misconfigured = GaugeMetricFamily(
            "pgreembed_slot_misconfigured", "1 while the provider refuses every request of"
            " the column as configured (nothing is sent until `pgreembed init`).",
            labels=["target", "column", "model"])
        spent = GaugeMetricFamily("pgreembed_migration_spend_usd",
                                  "List-price spend of an open migration's new column.",
                                  labels=["target", "column"])
        caps = GaugeMetricFamily("pgreembed_migration_spend_cap_usd",
                                 "Its spend cap (only migrations started with one).",
                                 labels=["target", "column"])
        pace = GaugeMetricFamily("pgreembed_throttle_factor",
                                 "Share of [throttle] max_rows_per_second in force now (the"
                                 " adaptive back-offs); only when a cap is set.")
        pace_rows = GaugeMetricFamily("pgreembed_throttle_rows_per_second",
                                      "The pace in force now: the cap times that share.")
        chunking = GaugeMetricFamily(
            "pgreembed_chunking", "Chunked targets: parents (estimated past 100,000),"
            " parents_to_chunk (marked for the chunk stage), gone_marks (deletes still to"
            " sweep), chunks (estimated past 100,000), chunks_pending (no vector yet).",
            labels=["target", "state"])
        chunk_age = GaugeMetricFamily("pgreembed_chunking_oldest_mark_seconds",
                                      "Age of the oldest parent waiting for the chunk stage"
                                      " (0 when none waits).", labels=["target"])
        scrape = GaugeMetricFamily("pgreembed_scrape_seconds",
                                   "Time this scrape spent reading Postgres and Redis.")
        started = time.perf_counter()
        try:
            client = redis.Redis.from_url(self.settings.redis_url, socket_connect_timeout=2)
            with connect(self.settings.database_url) as conn:
                statuses = collect(conn, self.settings, client)
                usage = usage_by_model(conn)
                created = slots_created_at(conn)
                migrations = migration_spend(conn)
                chunked = chunking_status(conn, self.settings)
                conn.commit()
            throttle = observe(self.settings.throttle, client)
            ages = {s.slot: oldest_pending_seconds(
                client, s.slot, self.settings.lease_seconds, s.pending, s.in_flight or 0,
                float(created.get(s.slot, 0.0))) for s in statuses}
        except Exception as exc:  # noqa: BLE001 - a scrape must not crash the scheduler
            log.warning("metrics scrape failed: %s", type(exc).__name__)
            return
        for s in statuses:
            labels = [s.target, s.column, s.role]
            for state in ("total", "embedded", "pending", "stale", "outdated", "failed"):
                counts.add_metric([*labels, state], getattr(s, state))
            if s.in_flight is not None:
                counts.add_metric([*labels, "in_flight"], s.in_flight)
            coverage.add_metric(labels, s.coverage)
            misconfigured.add_metric([s.target, s.column, s.model],
                                     1.0 if s.misconfigured else 0.0)
            oldest.add_metric(labels, ages[s.slot])
            for model, used in usage.get(s.slot, {}).items():
                tokens.add_metric([s.target, s.column, model or s.model], used)
                cost.add_metric([s.target, s.column, model or s.model],
                                used / 1e6 * list_price(model or s.model))
            if s.slot not in usage:
                tokens.add_metric([s.target, s.column, s.model], 0.0)
                cost.add_metric([s.target, s.column, s.model], 0.0)
        columns = {s.slot: (s.target, s.column) for s in statuses}
        for slot_id, usd, cap in migrations:
            if slot_id in columns:
                spent.add_metric(list(columns[slot_id]), usd)
                if cap is not None:
                    caps.add_metric(list(columns[slot_id]), cap)
        if throttle.factor is not None and throttle.rows_per_second_now is not None:
            pace.add_metric([], throttle.factor)
            pace_rows.add_metric([], throttle.rows_per_second_now)
        for each in chunked:
            for state in ("parents", "parents_to_chunk", "gone_marks", "chunks",
                          "chunks_pending"):
                chunking.add_metric([each.target, state], getattr(each, state))
            chunk_age.add_metric([each.target], each.oldest_mark_seconds or 0.0)
        scrape.add_metric([], time.perf_counter() - started)
        yield from (counts, coverage, oldest, tokens, cost, spent, caps, misconfigured, pace,
                    pace_rows, chunking, chunk_age, scrape)


def list_price(model_key: str) -> float:
    """USD per million tokens of a model key (`<provider>:<name>@<dims>`); 0: unknown."""
    from pgreembed.embedding.pricing import list_price as price

    provider, model, _ = parse_model_key(model_key)
    return price(provider, model) or 0.0


def serve_scheduler_metrics(settings: Any) -> bool:
    """Start the scheduler's exposition server if its port is configured."""
    port = environment.SCHEDULER_METRICS_PORT.get()
    if not port:
        return False
    require_prometheus(SCHEDULER_PORT_ENV)
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    registry.register(DatabaseCollector(settings))
    start_http_server(int(port), addr=environment.METRICS_HOST.get(),
                      registry=registry)
    log.info("scheduler metrics on port %s", port)
    return True
