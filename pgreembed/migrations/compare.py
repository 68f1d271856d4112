"""`pgreembed migrate compare`: the quality gate before a swap, measured on the app's data.

Each query is embedded with both models (query texts from a file, or the texts of
N rows sampled from the table as self-retrieval queries) and searched in the live
and the incoming column. Per column: recall@k of its ANN index against exact
search on the same column (at the settings pgreembed.operations.search applies, see
`pgreembed.operations.recall`), latency p50/p99 and, for sampled rows, where the model finds
the row itself (self-recall@1 and @k of exact search). Between the models:
overlap@k of their exact results. It changes nothing in the app's table; it
spends tokens (printed before it runs), and the incoming model's share counts
against the migration's spend cap like the fill's: reserved first (refused if it
would cross the cap), then recorded in the usage ledger. The report is kept in
`pgreembed.comparisons`; `migrate swap` shows the last one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from psycopg import sql

from pgreembed.config import Settings, Target
from pgreembed.embedding.embed import embed_rows
from pgreembed.embedding.pricing import list_price
from pgreembed.embedding.providers import make_provider
from pgreembed.embedding.providers.base import QUERY
from pgreembed.errors import ConfigError, MigrationError
from pgreembed.migrations.state import open_migration
from pgreembed.operations.recall import (
    DEFAULT_EXACT_TIMEOUT_MS,
    MAX_QUERIES,
    ColumnSearch,
    GroundTruth,
    Query,
    ann_index,
    sample_rows,
    vector_text,
)
from pgreembed.store.index_settings import recorded
from pgreembed.store.pool import connect
from pgreembed.store.slots import Slot, load_slots
from pgreembed.store.texts import no_text
from pgreembed.store.usage import reserve_tokens, spend
from pgreembed.store.versions import upgrade
from pgreembed.values import Row

DEFAULT_SAMPLE = 100


def read_queries(path: str) -> list[str]:
    """One query per line; blank lines skipped; at most MAX_QUERIES."""
    texts = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    texts = [t for t in texts if t]
    if not texts:
        raise ConfigError(f"--queries {path}: no query text in the file")
    if len(texts) > MAX_QUERIES:
        raise ConfigError(f"--queries {path}: {len(texts)} queries, at most {MAX_QUERIES}")
    return texts


@dataclass(frozen=True)
class _Side:
    """One column of the comparison and its model's cost."""

    name: str  # "live" | "incoming"
    slot: Slot
    tokens: int
    price_per_mtoken: float

    @property
    def cost_usd(self) -> float:
        return self.tokens / 1e6 * self.price_per_mtoken


def _price(slot: Slot) -> float:
    return list_price(slot.provider, slot.model, slot.target) or 0.0


def _slots(conn: psycopg.Connection, target: Target) -> tuple[int, Slot, Slot]:
    migration = open_migration(conn, target)
    if migration is None or migration.phase not in ("filling", "rolled_back"):
        state = "no migration in progress" if migration is None else (
            f"migration {migration.id} is {migration.phase}")
        raise MigrationError(f"target {target.name!r}: {state}; compare runs before a swap"
                             " (phase filling or rolled_back)")
    slots = load_slots(conn, target)
    live = next(s for s in slots if s.role == "live")
    incoming = next(s for s in slots if s.role in ("next", "old"))
    return migration.id, live, incoming


def _sampled(conn: psycopg.Connection, live: Slot, incoming: Slot, size: int
             ) -> list[tuple[Any, str]]:
    """Rows embedded in both columns (so each model can find the row itself)."""
    where = sql.SQL("a.{} IS NOT NULL AND a.{} IS NOT NULL AND NOT {}").format(
        live.vector, incoming.vector, no_text(live.text_expr))
    rows = sample_rows(conn, live, size, sql.SQL("a.{}, ({})::text").format(
        live.pk, live.text_expr), where)
    return [(key, text) for key, text in rows]


def compare(settings: Settings, target: Target, *, texts: Sequence[str] | None = None,
            sample: int | None = None, k: int = 10,
            announce: Callable[[str], None] = print,
            exact_timeout_ms: int = DEFAULT_EXACT_TIMEOUT_MS) -> dict[str, Any]:
    """Measure, store and return the comparison report (see the module docstring)."""
    with connect(settings.database_url, autocommit=True) as conn:
        migration_id, live, incoming = _slots(conn, target)
        keys: list[Any] | None = None
        if texts is None:
            picked = _sampled(conn, live, incoming, min(sample or DEFAULT_SAMPLE, MAX_QUERIES))
            if not picked:
                raise MigrationError(f"target {target.name!r}: no row is embedded in both"
                                     f" {live.vector_column} and {incoming.vector_column} yet")
            keys, texts = [key for key, _ in picked], [text for _, text in picked]
        sides = [_Side(name, slot, sum(_provider(settings, slot).count_tokens(texts)),
                       _price(slot)) for name, slot in (("live", live), ("incoming", incoming))]
        _announce_cost(conn, target, incoming, sides, len(texts), keys is not None, announce)
        vectors, billed, failed = _embed_both(settings, conn, incoming, sides, list(texts))
        report = _measure(conn, target, migration_id, sides, vectors, keys, failed, k,
                          exact_timeout_ms)
        report["tokens"] = {side.name: {"model": side.slot.model_key, "tokens_counted":
                                        side.tokens, "tokens_billed": billed[side.name],
                                        "cost_usd": round(billed[side.name] / 1e6 *
                                                          side.price_per_mtoken, 6)}
                            for side in sides}
        with conn.transaction():
            upgrade(conn, repeatable=False)  # a database init'ed before these tables
            conn.execute("INSERT INTO pgreembed.comparisons (migration_id, report)"
                         " VALUES (%s, %s::jsonb)", (migration_id, json.dumps(report)))
    return report


def _provider(settings: Settings, slot: Slot) -> Any:
    return make_provider(settings, slot.provider, slot.model, slot.dimensions, slot.target)


def _announce_cost(conn: psycopg.Connection, target: Target, incoming: Slot,
                   sides: list[_Side], count: int, sampled: bool,
                   announce: Callable[[str], None]) -> None:
    """Say what it will spend; refuse if the incoming model's share would cross the cap."""
    what = "sampled rows' texts" if sampled else "queries"
    announce(f"compare: embedding {count} {what} with both models: " + "; ".join(
        f"{side.slot.model_key} {side.tokens:,} tokens or fewer (${side.cost_usd:.6f})"
        for side in sides))
    _, spent, cap = spend(conn, incoming.id)
    if cap is None:
        return
    cost = sides[1].cost_usd
    announce(f"compare: the migration's spend cap is ${cap:.6f}, ${spent:.6f} spent; this"
             f" comparison adds ${cost:.6f}")
    if spent + cost > cap:
        raise MigrationError(
            f"target {target.name!r}: compare would spend ${cost:.6f} on {incoming.model_key}"
            f" and cross the migration's ${cap:.6f} spend cap (${spent:.6f} spent): use fewer"
            " queries, or raise the cap (`migrate resume --spend-cap USD`)")


def _embed_both(settings: Settings, conn: psycopg.Connection, incoming: Slot,
                sides: list[_Side], texts: list[str]
                ) -> tuple[dict[str, dict[int, str]], dict[str, int], list[dict[str, Any]]]:
    """Each model's query vectors by query index, the tokens billed, and the queries a
    model could not embed (dropped from both sides)."""
    vectors: dict[str, dict[int, str]] = {}
    billed: dict[str, int] = {}
    failed: list[dict[str, Any]] = []
    for side in sides:
        reservation = None
        if side.name == "incoming":
            with connect(settings.database_url) as spend_conn:
                reservation = reserve_tokens(spend_conn, incoming, side.tokens)
            if not reservation.granted:
                raise MigrationError(f"{incoming.model_key}: the migration's spend cap is"
                                     " reached (batches in flight hold the rest): try later")
        try:
            outcome = embed_rows([Row(i, text, None) for i, text in enumerate(texts)],
                                 _provider(settings, side.slot), truncate=True,
                                 input_type=QUERY)  # queries, as search sends them
        except BaseException:
            if reservation is not None:
                reservation.release()
            raise
        if side.name == "incoming":
            with conn.transaction():  # counts against the cap, like the fill's batches
                conn.execute("INSERT INTO pgreembed.usage (slot_id, inputs, tokens)"
                             " VALUES (%s, %s, %s)", (incoming.id, len(texts), outcome.tokens))
                if reservation is not None:
                    reservation.settle(conn)
        billed[side.name] = outcome.tokens
        vectors[side.name] = {int(e.row.pk): vector_text(side.slot, e.vector)
                              for e in outcome.embedded}
        failed += [{"query": int(f.row.pk), "model": side.slot.model_key, "reason": f.reason}
                   for f in outcome.failed]
    return vectors, billed, failed


def _measure(conn: psycopg.Connection, target: Target, migration_id: int,
             sides: list[_Side], vectors: dict[str, dict[int, str]], keys: list[Any] | None,
             failed: list[dict[str, Any]], k: int, exact_timeout_ms: int) -> dict[str, Any]:
    both = sorted(set(vectors["live"]) & set(vectors["incoming"]))
    columns: dict[str, Any] = {}
    exact: dict[str, list[list[Any]]] = {}
    for side in sides:
        slot = side.slot
        index = ann_index(conn, slot)
        search = ColumnSearch(conn, slot, k, index.distance if index else target.distance,
                              exact_timeout_ms=exact_timeout_ms)
        queries = [Query(vectors[side.name][i], keys[i] if keys else None) for i in both]
        truth = GroundTruth.measure(search, queries)
        exact[side.name] = truth.exact
        column: dict[str, Any] = {"column": slot.vector_column, "role": slot.role,
                                  "model": slot.model_key, "index": None, "settings": {},
                                  "recall": None, "p50_ms": None, "p99_ms": None}
        if index is not None:
            chosen = recorded(conn, slot.id)
            measured, _ = truth.ann(chosen)
            column.update(index=index.as_dict(), settings=chosen,
                          recall=round(measured.recall, 4), p50_ms=round(measured.p50_ms, 3),
                          p99_ms=round(measured.p99_ms, 3))
        if keys is not None:
            ranks = [found.index(q.key) + 1 if q.key in found else None
                     for q, found in zip(queries, truth.exact, strict=True)]
            column["self_recall_at_1"] = _fraction(r == 1 for r in ranks)
            column["self_recall_at_k"] = _fraction(r is not None for r in ranks)
        columns[side.name] = column
    overlap = [len(set(a) & set(b)) / max(1, min(k, max(len(a), len(b))))
               for a, b in zip(exact["live"], exact["incoming"], strict=True)]
    return {"target": target.name, "migration": migration_id, "k": k,
            "mode": "queries" if keys is None else "sample", "queries": len(both),
            "failed_queries": failed, "columns": columns,
            "overlap_at_k": round(float(np.mean(overlap)), 4) if overlap else None}


def _fraction(flags: Any) -> float | None:
    values = [bool(f) for f in flags]
    return round(sum(values) / len(values), 4) if values else None


def last_comparison(conn: psycopg.Connection, target: Target) -> dict[str, Any] | None:
    """The newest comparison of the target's open migration, with when it was measured."""
    migration = open_migration(conn, target)
    exists = conn.execute("SELECT to_regclass('pgreembed.comparisons') IS NOT NULL").fetchone()
    if migration is None or not exists or not exists[0]:
        return None
    row = conn.execute("SELECT report, measured_at FROM pgreembed.comparisons"
                       " WHERE migration_id = %s ORDER BY id DESC LIMIT 1",
                       (migration.id,)).fetchone()
    if row is None:
        return None
    return {**row[0], "measured_at": row[1].isoformat()}


def _number(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def report_lines(report: dict[str, Any]) -> list[str]:
    """The comparison as a table (what `migrate compare` and `migrate swap` print)."""
    k = report["k"]
    what = ("sampled rows as self-retrieval queries" if report["mode"] == "sample"
            else "queries from the file")
    lines = [f"comparison of migration {report['migration']} ({report['target']}):"
             f" {report['queries']} {what}, k={k}"
             f"{', measured ' + report['measured_at'] if 'measured_at' in report else ''}",
             f"  {'':<9} {'column':<24} {'model':<32} {'recall@' + str(k):>9} {'p50 ms':>7}"
             f" {'p99 ms':>7} {'self@1':>7} {'self@' + str(k):>7}"]
    for name in ("live", "incoming"):
        c = report["columns"][name]
        lines.append(f"  {name:<9} {c['column']:<24} {c['model']:<32}"
                     f" {_number(c['recall']):>9} {_number(c['p50_ms'], 2):>7}"
                     f" {_number(c['p99_ms'], 2):>7} {_number(c.get('self_recall_at_1')):>7}"
                     f" {_number(c.get('self_recall_at_k')):>7}")
        if c["index"] is None:
            lines.append(f"  {name}: no ANN index: every search is exact (recall 1.0), and"
                         " scans the table")
    lines.append(f"  overlap@{k} of the two models' exact results:"
                 f" {_number(report['overlap_at_k'])}")
    if report["failed_queries"]:
        lines.append(f"  {len(report['failed_queries'])} queries could not be embedded and"
                     " were left out")
    return lines
