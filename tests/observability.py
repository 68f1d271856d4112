"""Helpers shared by the observability tests: the metric list of docs/operations.md, exposition
text parsed with prometheus_client's own parser."""

from __future__ import annotations

import re
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from pgreembed.testing.services import free_port

ROOT = Path(__file__).resolve().parent.parent
SUFFIXES = ("", "_total", "_bucket", "_count", "_sum", "_created")


@dataclass(frozen=True)
class Documented:
    name: str
    kind: str
    labels: frozenset[str]
    source: str


def documented_metrics(readme: Path = ROOT / "docs" / "operations.md") -> dict[str, Documented]:
    """The rows of the metrics reference table (docs/operations.md)."""
    text = readme.read_text()
    section = text.split("## Metrics reference", 1)[1].split("\n## ", 1)[0]
    found = {}
    row = re.compile(r"^\|\s*`([a-z_:]+)`\s*\|\s*(counter|gauge|histogram)\s*\|"
                     r"([^|]*)\|\s*(\w+)\s*\|")
    for line in section.splitlines():
        match = row.match(line)
        if match:
            name, kind, labels, source = match.groups()
            found[name] = Documented(name, kind, frozenset(
                x.strip() for x in labels.split(",") if x.strip()), source)
    return found


def scrape(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return str(response.read().decode())
    except OSError:
        return ""


def start_exporters(env: dict[str, str], tmp_path: Path) -> tuple[int, int]:
    """Point the worker's (Dramatiq's, multiprocess) and the scheduler's exporters at free
    local ports through `env`; returns (worker port, scheduler port)."""
    worker_port, scheduler_port = free_port(), free_port()
    prom_dir = tmp_path / "prom"
    prom_dir.mkdir()
    env.update({"dramatiq_prom_port": str(worker_port), "dramatiq_prom_host": "127.0.0.1",
                "dramatiq_prom_db": str(prom_dir),
                "PGREEMBED_SCHEDULER_METRICS_PORT": str(scheduler_port),
                "PGREEMBED_METRICS_HOST": "127.0.0.1"})
    return worker_port, scheduler_port


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name -> [(labels, value)], parsed from Prometheus exposition text."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return out


def emitted(parsed: dict[str, list[tuple[dict[str, str], float]]], name: str
            ) -> list[tuple[dict[str, str], float]]:
    """The samples of metric `name`, whichever suffix its type adds."""
    base = name.removesuffix("_total")
    return [s for suffix in SUFFIXES for candidate in {name + suffix, base + suffix}
            for s in parsed.get(candidate, []) if not candidate.endswith("_created")
            or name.endswith("_created")]


def total(parsed: dict[str, list[tuple[dict[str, str], float]]], name: str,
          **labels: str) -> float:
    """The sum of sample `name` over the series with `labels` (0 if there is none)."""
    return sum(v for found, v in parsed.get(name, [])
               if all(found.get(k) == want for k, want in labels.items()))


def value(parsed: dict[str, list[tuple[dict[str, str], float]]], name: str,
          **labels: str) -> float | None:
    """Like `total`, but None when no series of `name` has `labels` (not emitted)."""
    if not any(all(found.get(k) == want for k, want in labels.items())
               for found, _ in parsed.get(name, [])):
        return None
    return total(parsed, name, **labels)


# Series Prometheus makes itself (not an exporter's): allowed in rules and dashboards.
PROMETHEUS_OWN = {"up"}
_PROMQL_WORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
                 "group_right", "offset", "bool", "inf", "nan"}


def promql_metrics(expr: str) -> set[str]:
    """Metric names an expression selects (label matchers, groupings, durations,
    strings and function calls removed first)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        rest = text[match.end():].lstrip()
        word = match.group(0)
        if rest.startswith("(") or word.lower() in _PROMQL_WORDS:
            continue
        if match.start() > 0 and (text[match.start() - 1].isdigit() or
                                  text[match.start() - 1] == "."):
            continue  # a unit or exponent of a number (5m, 1e3)
        names.add(word)
    return names


def deploy_queries() -> dict[str, set[str]]:
    """Every PromQL expression shipped in deploy/ -> the metric names it selects."""
    import json

    import yaml

    out: dict[str, set[str]] = {}
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus-alerts.yaml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            out[f"alert {rule['alert']}"] = promql_metrics(rule["expr"])
    dashboard = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            out[f"panel {panel['title']!r} {target['refId']}"] = promql_metrics(target["expr"])
    return out


def base_name(sample_name: str, known: set[str]) -> str | None:
    """The documented metric a sample name belongs to (histogram/counter suffixes)."""
    for suffix in SUFFIXES:
        stem = sample_name.removesuffix(suffix) if suffix else sample_name
        for candidate in (stem, stem + "_total"):
            if candidate in known:
                return candidate
    return None
