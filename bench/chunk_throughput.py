"""Chunks per second through the whole path (issue 25's bench): scheduler (chunk stage +
dispatch) -> Redis -> workers -> the local OpenAI-compatible server -> chunk table,
against the unchunked path embedding the same texts as rows, one run.

Corpus: `--docs` documents of ~4 kB (paragraphs, tests/chunk_corpus.py), split with the
recursive splitter at 800/400 characters (pgai's default). The chunked arm inserts the
documents into a parent table with a chunked target; the unchunked arm inserts each chunk
text as a row of an ordinary target (same provider inputs, same texts, so the difference
is what chunking costs: the parent's triggers, splitting, matching, the chunk table). Each
round starts both from scratch on fresh databases (inserted before the clock starts; the
clock runs from the scheduler's start to the last vector), arms interleaved; figures are
medians. Postgres CPU is every backend's (psutil over the postmaster's tree) in the
window, per embedded text.

    PYTHONPATH=$PWD .venv/bin/python -m bench.chunk_throughput --docs 1000 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
import uuid
from typing import Any

import psycopg
from psycopg import sql

from bench.harness import CpuMeter, Services, Tuning, pipeline
from pgreembed.chunking.splitter import chunker
from pgreembed.config.chunking import Chunking

MODEL, DIMS = "fake-384", 384
TUNING = Tuning(batch_size=256, processes=2, threads=4, max_inflight_rows=4096)
CHUNKING = "\n[target.chunking]\nsize = 800\noverlap = 400\n"


def documents(count: int) -> list[str]:
    """~4 kB documents of paragraphs (5-10 chunks each at 800/400)."""
    from tests.chunk_corpus import paragraph

    rng = random.Random(25)
    out = []
    for _ in range(count):
        paragraphs: list[str] = []
        while sum(len(p) + 2 for p in paragraphs) < 4000:
            paragraphs.append(paragraph(rng))
        out.append("\n\n".join(paragraphs))
    return out


def split_all(texts: list[str]) -> list[str]:
    split = chunker(Chunking(size=800, overlap=400), "openai", MODEL)
    return [chunk for text in texts for chunk in split(text, {})]


def fresh_database(services: Services, label: str, rows: list[str]) -> str:
    name = f"bench_{label}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(services.admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = services.dsn(name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION vector")
        conn.execute("CREATE TABLE docs (id bigint PRIMARY KEY, body text NOT NULL)")
        with conn.cursor() as cur, cur.copy("COPY docs (id, body) FROM STDIN") as copy:
            for key, text in enumerate(rows, start=1):
                copy.write_row((key, text))
        conn.execute("VACUUM ANALYZE docs")
    return dsn


def done(dsn: str, chunked: bool, expected: int) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        if not chunked:
            row = conn.execute("SELECT count(*) FROM docs WHERE embedding IS NULL").fetchone()
            return row == (0,)
        row = conn.execute(
            "SELECT (SELECT count(*) FROM pgreembed.chunk_dirty_docs),"
            " (SELECT count(*) FROM docs_chunks WHERE embedding IS NULL),"
            " (SELECT count(*) FROM docs_chunks)").fetchone()
        return row == (0, 0, expected)


def arm(services: Services, chunked: bool, docs: list[str], chunks: list[str]
        ) -> dict[str, Any]:
    rows = docs if chunked else chunks
    dsn = fresh_database(services, "chunked" if chunked else "rows", rows)
    try:
        with pipeline(services, dsn, TUNING, model=MODEL,
                      extra_config=CHUNKING if chunked else "") as run:
            run.start_worker()
            services.fake.reset()
            meter = CpuMeter(services, run.processes[0].pid)
            started = time.perf_counter()
            run.start_scheduler()
            while not done(dsn, chunked, len(chunks)):
                if time.perf_counter() - started > 1800 or not run.alive():
                    raise RuntimeError(f"{'chunked' if chunked else 'rows'} arm did not finish:"
                                       f" {run.log_text('scheduler')[-1500:]}")
                time.sleep(0.2)  # polling: each poll is a few ms of Postgres CPU
            seconds = time.perf_counter() - started
            cpu = meter.stop()
    finally:
        services.drop(dsn)
    inputs = services.fake.stats()["inputs_embedded"]
    return {"chunked": chunked, "seconds": seconds, "texts": len(chunks), "inputs": inputs,
            "texts_per_second": len(chunks) / seconds,
            "postgres_cpu_ms_per_text": 1000 * cpu["postgres"] / len(chunks),
            "workers_cpu_ms_per_text": 1000 * cpu.get("workers", 0.0) / len(chunks)}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--docs", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    docs = documents(args.docs)
    chunks = split_all(docs)
    services = Services(MODEL, DIMS).start()
    runs: list[dict[str, Any]] = []
    try:
        for _ in range(args.rounds):
            for chunked in (False, True):  # interleaved: both see the same machine load
                runs.append(arm(services, chunked, docs, chunks))
    finally:
        services.stop()
    median = {name: {k: statistics.median(r[k] for r in runs if r["chunked"] == flag)
                     for k in ("seconds", "texts_per_second", "postgres_cpu_ms_per_text",
                               "workers_cpu_ms_per_text", "inputs")}
              for name, flag in (("rows", False), ("chunked", True))}
    print(f"{args.docs} documents, {len(chunks)} chunks (recursive 800/400), {MODEL};"
          f" {TUNING.describe()}; median of {args.rounds} interleaved rounds")
    for name, m in median.items():
        print(f"{name}: {m['texts_per_second']:,.0f} texts/s ({m['seconds']:.1f} s,"
              f" {m['inputs']:.0f} inputs), Postgres CPU {m['postgres_cpu_ms_per_text']:.2f}"
              f" ms a text, workers {m['workers_cpu_ms_per_text']:.2f} ms a text")
    ours, plain = median["chunked"], median["rows"]
    speed = ours["texts_per_second"] / plain["texts_per_second"]
    cpu = ours["postgres_cpu_ms_per_text"] / plain["postgres_cpu_ms_per_text"]
    print(f"ratio chunked/rows: throughput {speed:.2f}x, Postgres CPU a text {cpu:.2f}x")
    print("result: " + json.dumps({**vars(args), "chunks": len(chunks), "median": median,
                                   "runs": runs}))


if __name__ == "__main__":
    main()
