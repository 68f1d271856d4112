"""The measurements: each returns numbers for ours and for its baseline, from the same run."""

from __future__ import annotations

import concurrent.futures
import contextlib
import math
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import psycopg
from pgvector.psycopg import register_vector
from psycopg import sql

from bench.harness import (
    API_KEY,
    ROOT,
    CpuMeter,
    Progress,
    RssSampler,
    Services,
    Tuning,
    count_pending,
    pipeline,
    rows_in_usage_ledger,
    texts,
    verify_vectors,
    wait_all_embedded,
)
from pgreembed.testing.fake_vectors import fake_token_count, fake_vectors


@dataclass
class OursRun:
    rows: int
    tuning: Tuning
    progress: Progress
    peak_rss_total: int
    peak_rss_single: int
    requests: int
    status_counts: dict[str, int]
    cpu: str
    cpu_used: dict[str, float]


def run_ours(services: Services, rows: int, tuning: Tuning, wrapper: list[str] | None = None,
             timeout: float = 1800.0, index: str | None = None,
             extra_config: str = "") -> OursRun:
    """The full pipeline on a fresh copy: `pgreembed init`, `dramatiq worker` started
    (until every process says it is ready), then one `pgreembed tick --wait` pass.
    `index`: the copy's vector column already carries that index (bench.harness.INDEXES)."""
    dsn = services.fresh_copy(rows, "ours", index)
    services.fake.reset()
    try:
        cold_start = time.monotonic()
        with pipeline(services, dsn, tuning, init=False, extra_config=extra_config) as run:
            run.cli("init")
            worker = run.start_worker(wrapper)
            sampler = RssSampler(worker.pid)
            sampler.start()
            meter = CpuMeter(services, worker.pid)
            started = time.monotonic()
            tick = run.start_tick(timeout)
            progress = wait_all_embedded(dsn, rows, cold_start, started, timeout,
                                         alive=run.alive, count_done=rows_in_usage_ledger)
            code = tick.wait(60)
            meter.stop()
            sampler.stop()
            if code != 0:
                raise RuntimeError(f"pgreembed tick exited {code}: {run.log_text('tick')[-2000:]}")
            if wrapper:
                _stop_profiled(worker)
        verify_vectors(dsn, services.model, services.dims, rows)
        stats = services.fake.stats()
        return OursRun(rows, tuning, progress, sampler.peak_total, sampler.peak_single,
                       stats["requests"], stats["status_counts"], meter.describe(),
                       dict(meter.used))
    finally:
        services.drop(dsn)


def _stop_profiled(wrapper_process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the profiled worker (not py-spy), so py-spy writes its report as it exits."""
    for child in psutil.Process(wrapper_process.pid).children():
        with contextlib.suppress(psutil.NoSuchProcess):
            child.send_signal(signal.SIGTERM)
    wrapper_process.wait(60)


# -- 1. ceiling ---------------------------------------------------------------------

@dataclass
class CeilingRun:
    strategy: str
    rows: int
    seconds: float
    cpu: str
    cpu_used: dict[str, float]

    @property
    def rate(self) -> float:
        return self.rows / self.seconds


def ceiling_strategies(batch_size: int, cores: int) -> dict[str, tuple[int | None, int]]:
    """Raw ways to write the vectors: name -> (rows per transaction or None for all,
    connections writing at once). Which is fastest depends on the machine: one big
    transaction spills its temporary table to disk where memory or disk is slow."""
    return {"one transaction": (None, 1),
            f"{batch_size}-row transactions": (batch_size, 1),
            f"{batch_size}-row transactions on {cores} connections": (batch_size, cores)}


_VECTORS: dict[tuple[str, int, int], list[tuple[int, Any]]] = {}


def run_ceiling(services: Services, rows: int, tuning: Tuning, index: str | None = None,
                strategies: dict[str, tuple[int | None, int]] | None = None,
                with_state_row: bool = False) -> list[CeilingRun]:
    """The same vectors written straight into the same table (after the same `init`):
    binary COPY into a temporary table and UPDATE ... FROM, no provider, no queue.
    Vectors are computed before the clock starts (once per run of the bench). One
    write per strategy, each on a fresh copy, fastest first. `with_state_row`: each
    transaction also upserts pgreembed's state row of every vector (not a ceiling: it
    shows how much of our Postgres CPU that bookkeeping is)."""
    vectors = _VECTORS.get((services.model, services.dims, rows), [])
    results: list[CeilingRun] = []
    strategies = strategies or ceiling_strategies(tuning.batch_size, os.cpu_count() or 1)
    for name, (chunk_rows, connections) in strategies.items():
        dsn = services.fresh_copy(rows, "ceiling", index)
        try:
            with pipeline(services, dsn, tuning):
                pass  # `pgreembed init` only: same column, partial index and triggers
            with psycopg.connect(dsn) as conn:
                vector_type = _vector_type(conn)
                if not vectors:
                    vectors = _precomputed(services, conn, vector_type)
                    _VECTORS[(services.model, services.dims, rows)] = vectors
                chunks = [vectors[i:i + (chunk_rows or rows)]
                          for i in range(0, rows, chunk_rows or rows)]
                results.append(_timed_write(services, dsn, name, rows, vector_type, chunks,
                                            connections, with_state_row))
                if count_pending(conn):
                    raise AssertionError(f"the ceiling write ({name}) left rows without a vector")
            verify_vectors(dsn, services.model, services.dims, rows)
        finally:
            services.drop(dsn)
    return sorted(results, key=lambda r: r.seconds)


def _vector_type(conn: psycopg.Connection) -> str:
    row = conn.execute("SELECT format_type(atttypid, NULL) FROM pg_attribute"
                       " WHERE attrelid = 'docs'::regclass AND attname = 'embedding'").fetchone()
    return str(row[0]) if row else "vector"


def _precomputed(services: Services, conn: psycopg.Connection, vector_type: str
                 ) -> list[tuple[int, Any]]:
    pairs = conn.execute("SELECT id, body FROM docs ORDER BY id").fetchall()
    conn.commit()
    vectors = fake_vectors(services.model, [body for _, body in pairs], services.dims)
    if vector_type == "halfvec":
        from pgvector import HalfVector

        return [(pk, HalfVector(v)) for (pk, _), v in zip(pairs, vectors, strict=True)]
    return [(pk, v) for (pk, _), v in zip(pairs, vectors, strict=True)]


STATE_ROW_SQL = """
    INSERT INTO pgreembed.{state} (pgr_pk, pgr_model_id, pgr_hash, pgr_embedded_at)
    SELECT i.id, s.model_id, md5(i.id::text)::uuid, now()
    FROM incoming i, pgreembed.slots s WHERE s.role = 'live' AND s.table_name = 'docs'
    ON CONFLICT (pgr_pk) DO UPDATE SET pgr_model_id = excluded.pgr_model_id,
        pgr_hash = excluded.pgr_hash, pgr_embedded_at = excluded.pgr_embedded_at
"""


def _state_table(conn: psycopg.Connection) -> str:
    row = conn.execute("SELECT 'slot_' || id FROM pgreembed.slots WHERE role = 'live'"
                       " AND table_name = 'docs'").fetchone()
    conn.commit()
    assert row is not None
    return str(row[0])


def _write_chunk(conn: psycopg.Connection, vector_type: str,
                 chunk: list[tuple[int, Any]], state_table: str | None = None) -> None:
    with conn.transaction():
        conn.execute(sql.SQL("CREATE TEMP TABLE IF NOT EXISTS incoming (id bigint, vec {})"
                             " ON COMMIT DELETE ROWS").format(sql.SQL(vector_type)))
        with conn.cursor() as cur:
            with cur.copy("COPY incoming (id, vec) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(["int8", vector_type])
                for item in chunk:
                    copy.write_row(item)
            cur.execute("UPDATE docs d SET embedding = i.vec FROM incoming i WHERE d.id = i.id")
            if state_table is not None:
                cur.execute(sql.SQL(STATE_ROW_SQL).format(state=sql.Identifier(state_table)))


def _timed_write(services: Services, dsn: str, name: str, rows: int, vector_type: str,
                 chunks: list[list[tuple[int, Any]]], connections: int,
                 with_state_row: bool = False) -> CeilingRun:
    """Write `chunks` on `connections` connections at once (opened before the clock)."""
    conns = [psycopg.connect(dsn, autocommit=True) for _ in range(connections)]
    try:
        for conn in conns:
            register_vector(conn)
        state_table = _state_table(conns[0]) if with_state_row else None
        meter = CpuMeter(services, None)
        started = time.monotonic()

        def write_share(index: int) -> None:
            for chunk in chunks[index::connections]:
                _write_chunk(conns[index], vector_type, chunk, state_table)

        with concurrent.futures.ThreadPoolExecutor(connections) as pool:
            list(pool.map(write_share, range(connections)))
        finished = time.monotonic()
        meter.stop()
    finally:
        for conn in conns:
            conn.close()
    meter.used["writer"] = meter.used.pop("provider")  # this process wrote
    meter.used.pop("tick")
    return CeilingRun(name, rows, finished - started, meter.describe(), dict(meter.used))


# -- 2. pgai --------------------------------------------------------------------------

@dataclass
class PgaiRun:
    label: str
    rows: int
    workers: int
    batch_size: int | None
    concurrency: int | None
    progress: Progress
    requests: int
    cpu: str


def pgai_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("pgai")
    except Exception:  # noqa: BLE001 - not installed
        return None


def run_pgai(services: Services, rows: int, label: str, workers: int = 1,
             batch_size: int | None = None, concurrency: int | None = None,
             timeout: float = 1800.0) -> PgaiRun:
    """pgai's vectorizer worker (`--once`) writing into a column of the same table copy,
    against the same provider (OpenAI embedder with base_url)."""
    import pgai

    dsn = services.fresh_copy(rows, "pgai")
    services.fake.reset()
    logdir = Path(services.workdir) / f"pgai-{label}"
    logdir.mkdir(exist_ok=True)
    processes: list[subprocess.Popen[bytes]] = []
    try:
        cold_start = time.monotonic()
        pgai.install(dsn)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                """
                SELECT ai.create_vectorizer('docs'::regclass, name => 'docs_embedding',
                    loading => ai.loading_column('body'),
                    embedding => ai.embedding_openai(%s, %s, base_url => %s),
                    chunking => ai.chunking_none(),
                    destination => ai.destination_column('embedding'),
                    indexing => ai.indexing_none(),
                    scheduling => ai.scheduling_none(),
                    processing => ai.processing_default(batch_size => %s, concurrency => %s))
                """, (services.model, services.dims, services.fake.base_url, batch_size,
                      concurrency))
        env = {**os.environ, "OPENAI_API_KEY": API_KEY}
        meter = CpuMeter(services, None)
        started = time.monotonic()
        for index in range(workers):
            log = (logdir / f"worker-{index}.log").open("ab")
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "pgai", "vectorizer", "worker", "--once", "-d", dsn],
                env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                start_new_session=True))

        def alive() -> bool:
            return all(p.poll() in (None, 0) for p in processes)

        try:
            progress = wait_all_embedded(dsn, rows, cold_start, started, timeout, alive=alive)
        except RuntimeError:
            tail = "".join((logdir / f"worker-{i}.log").read_text(errors="replace")[-1500:]
                           for i in range(workers))
            raise RuntimeError(f"pgai worker failed: {tail}") from None
        for process in processes:
            if process.wait(120) != 0:
                raise RuntimeError(f"pgai worker exited {process.returncode}")
        meter.stop()
        meter.used["workers"] = meter.used.pop("tick")  # the pgai workers, reaped by us
        verify_vectors(dsn, services.model, services.dims, rows)
        return PgaiRun(label, rows, workers, batch_size, concurrency, progress,
                       services.fake.stats()["requests"], meter.describe())
    finally:
        for process in processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)
        services.drop(dsn)


# -- 3. rate-limited provider ---------------------------------------------------------

@dataclass
class RateLimitRun:
    tokens_per_minute: int
    windows: int
    rows: int
    tokens_in_window: int
    status_counts: dict[str, int]
    requests: int
    client_budget: bool

    @property
    def fraction(self) -> float:
        return self.tokens_in_window / (self.tokens_per_minute * self.windows)

    @property
    def rejected(self) -> int:
        return int(self.status_counts.get("429", 0))


def client_budget_supported() -> bool:
    """Whether this version's target config takes `tokens_per_minute` (a shared limiter)."""
    from pgreembed.config import parse_target
    from pgreembed.errors import ConfigError

    try:
        parse_target({"name": "t", "table": "t", "text_column": "b", "vector_column": "v",
                      "provider": "openai", "model": "m", "dimensions": 8,
                      "tokens_per_minute": 1000}, {})
    except ConfigError:
        return False
    return True


def run_ratelimit(services: Services, tuning: Tuning, tokens_per_minute: int, windows: int,
                  client_budget: bool) -> RateLimitRun:
    """The provider allows `tokens_per_minute` over a sliding 60 s window that starts
    empty, so from the first request the most that can be admitted in `windows` minutes
    is `windows` x the budget. The table holds 1.5x that, so work never runs out."""
    per_row = statistics.mean(fake_token_count(t) for t in texts(1, 200))
    rows = math.ceil(1.5 * windows * tokens_per_minute / per_row)
    rows = int(math.ceil(rows / 1000) * 1000)
    dsn = services.fresh_copy(rows, "ratelimit")
    services.fake.reset()
    services.fake.set_faults(tokens_per_minute=tokens_per_minute)
    extra = {"tokens_per_minute": tokens_per_minute} if client_budget else {}
    try:
        with pipeline(services, dsn, tuning, extra) as run:
            run.start_worker()
            run.start_tick(timeout=3600)
            deadline = time.monotonic() + 60
            while services.fake.stats()["requests"] == 0:
                if time.monotonic() > deadline or not run.alive():
                    raise RuntimeError("no request reached the provider")
                time.sleep(0.005)
            first = time.monotonic()
            end = first + 60 * windows
            tokens = 0
            while (now := time.monotonic()) < end:
                tokens = services.fake.stats()["tokens_embedded"]
                time.sleep(min(0.05, max(0.0, end - now)))
            stats = services.fake.stats()
        return RateLimitRun(tokens_per_minute, windows, rows, tokens, stats["status_counts"],
                            stats["requests"], client_budget)
    finally:
        services.fake.reset()
        services.drop(dsn)


# -- 4. freshness ---------------------------------------------------------------------

@dataclass
class FreshnessRun:
    rate: float
    seconds: float
    latencies: list[float]
    cold_start: float

    def percentile(self, p: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]


def _warm_up(dsn: str, alive: Callable[[], bool], rows: int = 10) -> float:
    """Rows embedded one at a time before the measured stream (negative ids), so every
    worker process has most likely built its provider client and tokenizer, as in a
    service that has been running. Returns the first row's (cold) latency."""
    cold = 0.0
    with psycopg.connect(dsn, autocommit=True) as conn:
        for i in range(rows):
            started = time.monotonic()
            conn.execute("INSERT INTO docs (id, body) VALUES (%s, %s)", (-1 - i, f"warm up {i}"))
            while count_pending(conn):
                if time.monotonic() - started > 120 or not alive():
                    raise RuntimeError("the warm-up rows were not embedded")
                time.sleep(0.02)
            cold = cold or time.monotonic() - started
    return cold


def run_freshness(services: Services, tuning: Tuning, rate: float, seconds: float
                  ) -> FreshnessRun:
    """Rows inserted one by one at a steady rate while the continuous scheduler and the
    workers run; latency = from the INSERT's commit to the vector being visible to a
    reader (polled every 20 ms by a separate connection)."""
    dsn = services.fresh_copy(0, "fresh")
    services.fake.reset()
    total = int(rate * seconds)
    bodies = texts(1_000_000, total)
    inserted: dict[int, float] = {}
    seen: dict[int, float] = {}
    errors: list[BaseException] = []
    try:
        with pipeline(services, dsn, tuning) as run:
            run.start_worker()
            run.start_scheduler()
            cold_start = _warm_up(dsn, run.alive)

            def insert() -> None:
                try:
                    with psycopg.connect(dsn, autocommit=True) as conn:
                        start = time.monotonic()
                        for i in range(total):
                            pause = start + i / rate - time.monotonic()
                            if pause > 0:
                                time.sleep(pause)
                            conn.execute("INSERT INTO docs (id, body) VALUES (%s, %s)",
                                         (i + 1, bodies[i]))
                            inserted[i + 1] = time.monotonic()
                except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                    errors.append(exc)

            inserter = threading.Thread(target=insert, name="inserter", daemon=True)
            inserter.start()
            deadline = time.monotonic() + seconds + 60
            with psycopg.connect(dsn, autocommit=True) as conn:
                while len(seen) < total:
                    waiting = [k for k in list(inserted) if k not in seen]
                    if waiting:
                        found = conn.execute(
                            "SELECT id FROM docs WHERE id = ANY(%s) AND embedding IS NOT NULL",
                            (waiting,)).fetchall()
                        now = time.monotonic()
                        for (key,) in found:
                            seen[key] = now
                    if errors:
                        raise RuntimeError(f"inserting failed: {errors[0]!r}")
                    if time.monotonic() > deadline or not run.alive():
                        raise RuntimeError(f"{total - len(seen)} of {total} rows not embedded")
                    time.sleep(0.02)
            inserter.join()
        return FreshnessRun(rate, seconds, [seen[k] - inserted[k] for k in inserted], cold_start)
    finally:
        services.drop(dsn)
