"""Chunks per second through pgreembed's whole path against pgai 0.12.1's own worker.

Same documents (N parents of ~2 kB, 4-6 chunks each), same splitter settings (pgai's
default recursive 800/400, `$chunk`), same model and dimensions, both against the same
local OpenAI-compatible server at zero latency. Each run gets a fresh database with the
app's table empty and the side's machinery already running (pgai: `pgai install`, the
vectorizer and its worker; pgreembed: `init`, a worker and the scheduler); the clock starts
when the N rows are inserted in one statement (the triggers queue them) and stops when
every chunk is written with its vector. Postgres CPU counts every backend (the exited ones
too) over that window. Rounds alternate which side goes first; medians and ratios are
printed from one run.

Each side runs at its defaults: pgai's worker (`pgai vectorizer worker`: batch 50 rows,
concurrency 1) and pgreembed's (bench.harness.Tuning: 2 dramatiq processes x 4 threads,
batch 512 chunks).

    PYTHONPATH=$PWD .venv/bin/python -m bench.pgai_worker --parents 1000 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import time
from typing import Any

import psycopg
from psycopg import sql

from bench.harness import API_KEY, CpuMeter, Services, Tuning, pipeline
from pgreembed.chunking.splitter import chunker
from pgreembed.config.chunking import Chunking
from pgreembed.testing import pgai_side

MODEL = "text-embedding-3-small"
DIMS = 64
VECTORIZER = "docs_v"
CHUNKS = "docs_v_store"

CONFIG = pgai_side.adopted_target_toml(VECTORIZER, MODEL, DIMS, CHUNKS) + """
[worker]
poll_interval = 0.5
max_inflight_rows = {inflight}
pool_max_size = {pool}
"""


def body(key: int) -> str:
    rng = random.Random(key)
    return "\n\n".join(" ".join(f"parent {key} paragraph {p} word{rng.randint(0, 99)}"
                                for _ in range(rng.randint(8, 14))) + "." for p in range(6))


def fresh_database(services: Services, label: str) -> str:
    name = f"bench_{label}_{random.randrange(1 << 30):x}"
    with psycopg.connect(services.admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = services.dsn(name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION vector")
        conn.execute("CREATE TABLE docs (id bigint PRIMARY KEY, body text NOT NULL)")
    return dsn


def insert_all(dsn: str, parents: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO docs (id, body) SELECT * FROM unnest(%s::bigint[],"
                     " %s::text[])", (list(range(1, parents + 1)),
                                      [body(k) for k in range(1, parents + 1)]))


def done(dsn: str, chunks: int, dirty: str | None) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(sql.SQL("SELECT count(*), count(embedding) FROM {}").format(
            sql.Identifier(CHUNKS))).fetchone()
        left = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(
            sql.SQL(dirty))).fetchone() if dirty else (0,)
    return row == (chunks, chunks) and left == (0,)


def timed(services: Services, dsn: str, parents: int, chunks: int, dirty: str | None,
          timeout: float) -> dict[str, float]:
    meter = CpuMeter(services, None)
    started = time.monotonic()
    insert_all(dsn, parents)
    while not done(dsn, chunks, dirty):
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"not done after {timeout:.0f} s")
        time.sleep(0.1)
    seconds = time.monotonic() - started
    used = meter.stop()
    return {"seconds": seconds, "chunks_per_s": chunks / seconds,
            "pg_cpu_ms_per_chunk": 1000 * used["postgres"] / chunks}


def run_pgai(services: Services, parents: int, chunks: int, timeout: float
             ) -> dict[str, float]:
    dsn = fresh_database(services, "pgai")
    pgai_side.install_pgai(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        pgai_side.create_vectorizer(conn, pgai_side.VectorizerSpec(
            source="public.docs", name=VECTORIZER, model=MODEL, dimensions=DIMS,
            base_url=services.fake.base_url))
    log = services.workdir / f"pgai-{random.randrange(1 << 30):x}.log"
    worker = pgai_side.start_pgai_worker(dsn, API_KEY, log, poll_interval_s=1)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:  # started: it has heartbeated
            deadline = time.monotonic() + 120
            while conn.execute("SELECT count(*) FROM ai.vectorizer_worker_process"
                               ).fetchone() == (0,):
                if time.monotonic() > deadline or worker.poll() is not None:
                    raise RuntimeError(f"pgai's worker did not start: {log.read_text()[-2000:]}")
                time.sleep(0.1)
        return timed(services, dsn, parents, chunks, None, timeout)
    finally:
        worker.terminate()
        try:
            worker.wait(15)
        except subprocess.TimeoutExpired:
            worker.kill()
        services.drop(dsn)


def run_ours(services: Services, parents: int, chunks: int, timeout: float
             ) -> dict[str, float]:
    dsn = fresh_database(services, "ours")
    tuning = Tuning()
    try:
        with pipeline(services, dsn, tuning, init=False) as run:
            run.config_path.write_text(CONFIG.format(
                batch_size=tuning.batch_size, inflight=tuning.max_inflight_rows,
                pool=tuning.pool_max_size))
            run.cli("init")
            run.start_worker()
            run.start_scheduler()
            return timed(services, dsn, parents, chunks,
                         f"pgreembed.chunk_dirty_{VECTORIZER}", timeout)
    finally:
        services.drop(dsn)


def count_chunks(parents: int) -> int:
    """What both sides must write: the chunks of every document (pgai's defaults)."""
    split = chunker(Chunking(), "openai", MODEL)
    return sum(len(split(body(k), {})) for k in range(1, parents + 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parents", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()
    chunks = count_chunks(args.parents)
    services = Services(MODEL, DIMS).start()
    results: dict[str, list[dict[str, float]]] = {"pgai": [], "pgreembed": []}
    try:
        for r in range(args.rounds):
            order = ["pgai", "pgreembed"] if r % 2 == 0 else ["pgreembed", "pgai"]
            for side in order:
                run = run_pgai if side == "pgai" else run_ours
                result = run(services, args.parents, chunks, args.timeout)
                results[side].append(result)
                print(json.dumps({"round": r + 1, "side": side,
                                  **{k: round(v, 3) for k, v in result.items()}}), flush=True)
    finally:
        services.stop()
    medians: dict[str, Any] = {
        side: {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}
        for side, runs in results.items()}
    summary = {
        "parents": args.parents, "chunks": chunks, "rounds": args.rounds,
        "medians": medians,
        "chunks_per_s_ratio_pgreembed_over_pgai": round(
            medians["pgreembed"]["chunks_per_s"] / medians["pgai"]["chunks_per_s"], 2),
        "pg_cpu_per_chunk_ratio_pgreembed_over_pgai": round(
            medians["pgreembed"]["pg_cpu_ms_per_chunk"]
            / medians["pgai"]["pg_cpu_ms_per_chunk"], 2),
        "tuning_pgreembed": Tuning().describe(),
        "tuning_pgai": "pgai vectorizer worker defaults: batch 50 rows, concurrency 1",
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
