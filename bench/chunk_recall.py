"""Grouped search recall (issue 25, test 6): recall@10 of parents against exact search on
100k chunks through an HNSW index, and what moves it.

The chunks have the structure real ones have (tests/chunk_recall_data.py: parents about
topics, 10 close chunks a parent, so the nearest chunks crowd into few parents); each
query is embedded by the fake provider through `search_parents`, exact search is brute
force in numpy over the same vectors. Settings compared, rounds interleaved: the defaults
(hnsw.ef_search 40, iterative scans relaxed_order as search_parents turns them on),
ef_search 100 and 200, and iterative scans off (pgvector < 0.8, or an operator's choice).

    PYTHONPATH=$PWD .venv/bin/python -m bench.chunk_recall --parents 10000 --queries 200
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

from pgreembed.config import parse_settings
from pgreembed.operations.chunk_search import search_parents
from pgreembed.store.pool import connect
from pgreembed.store.setup import init_target
from pgreembed.testing.fake_openai import FakeOpenAIServer
from pgreembed.testing.fake_vectors import fake_vector
from pgreembed.testing.services import EmbeddedPostgres
from tests.chunk_recall_data import DIMS, MODEL, corpus, load

API_KEY = "sk-bench-local-0000"
# name -> the app session's settings before search_parents (which turns iterative scans
# on where the session has them off); "iterative scans off" runs it as on pgvector < 0.8.
VARIANTS: dict[str, dict[str, str]] = {
    "default (ef_search 40, iterative relaxed)": {},
    "ef_search 100": {"hnsw.ef_search": "100"},
    "ef_search 200": {"hnsw.ef_search": "200"},
}


def settings_for(dsn: str, base_url: str) -> Any:
    return parse_settings({"target": [{
        "name": "docs", "table": "public.docs", "text_column": "body",
        "vector_column": "embedding", "provider": "openai", "model": MODEL,
        "dimensions": DIMS, "chunking": {}}]},
        {"DATABASE_URL": dsn, "OPENAI_API_KEY": API_KEY, "OPENAI_BASE_URL": base_url})


def measure(dsn: str, base_url: str, parents: int, queries: int, rounds: int
            ) -> dict[str, Any]:
    with connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE docs (id bigint PRIMARY KEY, title text, body text)")
    settings = settings_for(dsn, base_url)
    init_target(dsn, settings.target("docs"))
    data = corpus(parents)
    started = time.perf_counter()
    with connect(dsn) as conn:
        load(conn, data)
        conn.commit()
    loaded = time.perf_counter() - started
    with connect(dsn, autocommit=True) as conn:
        conn.execute("SET maintenance_work_mem = '1GB'")
        started = time.perf_counter()
        conn.execute("CREATE INDEX ON docs_chunks USING hnsw (embedding vector_cosine_ops)"
                     " WITH (m = 16, ef_construction = 64)")
        built = time.perf_counter() - started
        conn.execute("ANALYZE docs_chunks")
    asked = data.queries[:queries]
    truth = {q: data.exact(fake_vector(MODEL, q, DIMS), 10) for q in asked}
    variants = {**VARIANTS, "iterative scans off": {"hnsw.iterative_scan": "off"}}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, session in variants.items():  # interleaved: same load for each
            runs[name].append(_round(dsn, settings, asked, truth, session,
                                     iterative=name != "iterative scans off"))
    return {"chunks": len(data.keys), "parents": parents, "queries": len(asked),
            "load_seconds": round(loaded, 1), "index_build_seconds": round(built, 1),
            "variants": {name: {k: round(statistics.median(r[k] for r in rs), 4)
                                for k in rs[0]} for name, rs in runs.items()}}


def _round(dsn: str, settings: Any, asked: list[str], truth: dict[str, list[int]],
           session: dict[str, str], iterative: bool) -> dict[str, float]:
    import pgreembed.operations.chunk_search as chunk_search

    recalls, seconds, short = [], [], 0
    original = chunk_search._iterative_scans
    if not iterative:  # what search_parents does on pgvector < 0.8: no iterative scans
        chunk_search._iterative_scans = lambda conn: None
    try:
        with connect(dsn, autocommit=True) as app:
            app.execute("SET enable_seqscan = off")
            for name, value in session.items():
                app.execute("SELECT set_config(%s, %s, false)", (name, value))
            for query in asked:
                started = time.perf_counter()
                hits = search_parents(app, settings, "docs", query, limit=10,
                                      index_settings={})
                seconds.append(time.perf_counter() - started)
                short += len(hits) < 10
                recalls.append(len({h.key for h in hits} & set(truth[query])) / 10)
    finally:
        chunk_search._iterative_scans = original
    return {"recall_at_10": sum(recalls) / len(recalls), "worst": min(recalls),
            "fewer_than_10": short, "median_ms": 1000 * statistics.median(seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--parents", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pgreembed-chunk-recall-") as folder:
        server = EmbeddedPostgres(Path(folder) / "pg")
        fake = FakeOpenAIServer(api_key=API_KEY).start()
        try:
            dsn = server.start()
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            result = measure(dsn, fake.base_url, args.parents, args.queries, args.rounds)
        finally:
            fake.stop()
            server.stop()
    print(f"{result['chunks']} chunks of {result['parents']} parents, {result['queries']}"
          f" queries, median of {args.rounds} interleaved rounds; HNSW m 16,"
          f" ef_construction 64 built in {result['index_build_seconds']} s")
    for name, figures in result["variants"].items():
        print(f"{name}: recall@10 {figures['recall_at_10']:.3f} (worst query"
              f" {figures['worst']:.1f}), {figures['fewer_than_10']:.0f} queries with fewer"
              f" than 10 parents, {figures['median_ms']:.1f} ms a search")
    print("result: " + json.dumps({**vars(args), **result}))


if __name__ == "__main__":
    main()
