"""Worker-side Prometheus instruments (rows, tokens, cost, failures, provider latency).

Each worker process counts what it does; Dramatiq's Prometheus middleware aggregates
the processes through its multiprocess directory and serves them on
`dramatiq_prom_port`. Off unless that port is set.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from typing import Any

from pgreembed.config import environment
from pgreembed.errors import MetricsUnavailable

WORKER_PORT_ENV = environment.WORKER_METRICS_PORT.name
SCHEDULER_PORT_ENV = environment.SCHEDULER_METRICS_PORT.name


def require_prometheus(setting: str) -> None:
    """Fail at start-up, with the fix, rather than on every batch or scrape.

    Only looks the package up: importing it here, before Dramatiq's middleware sets
    its multiprocess directory, would make every worker process count on its own.
    """
    if importlib.util.find_spec("prometheus_client") is None:
        raise MetricsUnavailable(
            f"{setting} is set but prometheus-client is not installed:"
            " pip install 'pgreembed[metrics]'")


@dataclass(frozen=True)
class WorkerMetrics:
    rows: Any
    tokens: Any
    cost: Any
    failures: Any
    changed: Any
    reused: Any
    provider_seconds: Any
    provider_errors: Any
    lag: Any


@functools.cache
def worker_metrics() -> WorkerMetrics | None:
    """The worker's metrics, created after Dramatiq set up its multiprocess directory."""
    if not environment.WORKER_METRICS_PORT.get():
        return None
    import prometheus_client as prom

    return WorkerMetrics(
        rows=prom.Counter("pgreembed_rows_embedded_total", "Vectors written.",
                          ["target", "column"]),
        tokens=prom.Counter("pgreembed_tokens_total", "Tokens billed (providers' reported usage).",
                            ["target", "model"]),
        cost=prom.Counter("pgreembed_cost_usd_total", "List-price cost of those tokens.",
                          ["target", "model"]),
        failures=prom.Counter("pgreembed_row_failures_total", "Rows recorded as failed.",
                              ["target", "reason"]),
        changed=prom.Counter("pgreembed_rows_changed_in_flight_total",
                             "Vectors not written because the text changed meanwhile.",
                             ["target"]),
        reused=prom.Counter("pgreembed_rows_reused_total",
                            "Vectors written without a provider call: an identical text's"
                            " vector of the same model, copied.", ["target", "column"]),
        provider_seconds=prom.Histogram("pgreembed_provider_request_seconds",
                                        "Provider request latency.", ["model"]),
        provider_errors=prom.Counter("pgreembed_provider_errors_total",
                                     "Provider errors by HTTP status (429, 500, timeout...).",
                                     ["model", "status"]),
        lag=prom.Histogram("pgreembed_embed_lag_seconds",
                           "From a row's claim by the scheduler (its enqueue) to its vector"
                           " committed.", ["target", "column"],
                           buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900,
                                    3600)),
    )


def failure_kind(reason: str) -> str:
    """A small, fixed set of label values (the reason text itself is unbounded)."""
    for prefix, kind in (("text is", "empty"), ("text has", "too_long"),
                         ("provider rejected", "rejected"), ("provider returned", "bad_vector"),
                         ("database rejected", "write_rejected")):
        if reason.startswith(prefix):
            return kind
    return "other"


def observe_provider(model: str, seconds: float | None = None, status: str | None = None
                     ) -> None:
    metrics = worker_metrics()
    if metrics is None:
        return
    if seconds is not None:
        metrics.provider_seconds.labels(model).observe(seconds)
    if status is not None:
        metrics.provider_errors.labels(model, status).inc()
