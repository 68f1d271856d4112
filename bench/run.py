"""Benchmarks: ours against a baseline on the same rows, same machine, same run.

    python -m bench.run [--rows N] [--dims D] [--only indexed,sidepath,applatency,ceiling,...]

Sections (all but `profile` by default):
  indexed    into an HNSW- and an IVFFlat-indexed column (the table users have): the
             fastest raw write vs our full pipeline; the unindexed pair as a second line
  sidepath   a backlog (every row pending) on an HNSW-indexed column: direct writes vs
             the automatic side path (fill + CREATE INDEX CONCURRENTLY + swap); then a
             model change of a filled HNSW column in place vs through a side column
  applatency the app's p99 (pgbench: vector search + small write) idle, during a
             full-speed backfill, and during one under [throttle]
  ceiling    raw binary COPY + UPDATE ... FROM of precomputed vectors vs our full pipeline
  pgai       pgai's vectorizer worker (same rows, same provider) vs ours
  memory     worker peak RSS at N and 4N rows
  freshness  insert -> embedded latency with the continuous scheduler running
  ratelimit  achieved share of a tokens/min budget and the number of 429s (>= 60 s)
  profile    py-spy on the workers while they embed N rows; the top of the profile
Everything runs on private services: embedded Postgres under /tmp, a redis-server
process, the local OpenAI-compatible server (zero latency, deterministic vectors).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psycopg

from bench import profile as profiling
from bench.app_latency import run_phase, throttle_config
from bench.harness import Services, Tuning, fmt_rate, tiktoken_cache_dir
from bench.indexed import measure_indexed, measure_side_path
from bench.sections import (
    CeilingRun,
    OursRun,
    ceiling_strategies,
    client_budget_supported,
    pgai_version,
    run_ceiling,
    run_freshness,
    run_ours,
    run_pgai,
    run_ratelimit,
)
from bench.side_backlog import measure_backlog

SECTIONS = ("indexed", "sidepath", "applatency", "ceiling", "pgai", "memory", "freshness",
            "ratelimit", "profile")
DEFAULT_SECTIONS = ("indexed", "sidepath", "applatency", "ceiling", "pgai", "memory",
                    "freshness", "ratelimit")
MB = 1024 * 1024


def _parse_sections(value: str) -> list[str]:
    chosen = [s.strip() for s in value.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown section(s) {', '.join(unknown)};"
                                         f" choose from {', '.join(SECTIONS)}")
    return chosen


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.run",
                                     description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=100_000,
                        help="rows N (default 100000, ~13 min; --rows 20000 takes ~4)")
    parser.add_argument("--dims", type=int, default=1536, help="vector size (model fake-D)")
    parser.add_argument("--indexed-rows", type=int, default=10_000,
                        help="rows of the indexed, sidepath and applatency sections (default"
                             " 10000: an HNSW-indexed write runs at ~200-400 rows/s here)")
    parser.add_argument("--indexes", default="hnsw,ivfflat",
                        help="indexed: the indexes measured (hnsw, ivfflat)")
    parser.add_argument("--app-seconds", type=float, default=20.0,
                        help="applatency: seconds of app traffic per phase")
    parser.add_argument("--app-rate", type=float, default=20.0,
                        help="applatency: app transactions per second (pgbench -R)")
    parser.add_argument("--app-clients", type=int, default=2, help="applatency: pgbench clients")
    parser.add_argument("--app-batch-size", type=int, default=64,
                        help="applatency: our rows per message (an HNSW write of 512 rows holds"
                             " a core for seconds, whatever the pace)")
    parser.add_argument("--only", type=_parse_sections, default=list(DEFAULT_SECTIONS),
                        help=f"comma-separated sections among {', '.join(SECTIONS)}")
    parser.add_argument("--batch-size", type=int, default=512, help="our rows per message")
    parser.add_argument("--processes", type=int, default=2, help="our worker processes")
    parser.add_argument("--threads", type=int, default=4, help="our threads per process")
    parser.add_argument("--max-inflight", type=int, default=4096,
                        help="our max_inflight_rows (continuous scheduler)")
    parser.add_argument("--pool-max-size", type=int, default=4,
                        help="our Postgres connections per worker process")
    parser.add_argument("--repeats", type=int, default=3,
                        help="our runs at N, each after a round of raw writes (the median"
                             " counts; the machine is shared)")
    parser.add_argument("--pgai-runs", default="default,tuned",
                        help="pgai configurations: default (1 worker, its defaults) and/or"
                             " tuned (our batch size, --processes workers x --threads"
                             " concurrency, max 10)")
    parser.add_argument("--tpm", type=int, default=1_000_000,
                        help="ratelimit: the provider's tokens per minute")
    parser.add_argument("--windows", type=int, default=1,
                        help="ratelimit: minutes measured (each one a full 60 s window)")
    parser.add_argument("--no-client-budget", action="store_true",
                        help="ratelimit: do not give the target the budget (tokens_per_minute)")
    parser.add_argument("--fresh-rate", type=float, default=20.0, help="freshness: rows/s")
    parser.add_argument("--fresh-seconds", type=float, default=30.0,
                        help="freshness: seconds of inserts")
    parser.add_argument("--profile-output", type=Path, default=None,
                        help="profile: keep py-spy's raw output here")
    return parser


def _machine() -> str:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    return (f"{os.cpu_count()} cores ({model}), {memory:.0f} GiB, {platform.system()}"
            f" {platform.release()}, Python {platform.python_version()}")


def _server_versions(services: Services) -> str:
    with psycopg.connect(services.admin_dsn) as conn:
        pg = conn.execute("SHOW server_version").fetchone()
        vec = conn.execute("SELECT default_version FROM pg_available_extensions"
                           " WHERE name = 'vector'").fetchone()
    redis_version = subprocess.run(["redis-server", "--version"], capture_output=True,
                                   text=True).stdout.split(" sha=")[0].strip(
                                   ) if _has("redis-server") else "?"
    return (f"Postgres {pg[0] if pg else '?'} + pgvector {vec[0] if vec else '?'},"
            f" {redis_version or 'redis ?'}, pgai {pgai_version() or 'not installed'}")


def _has(binary: str) -> bool:
    from shutil import which

    return which(binary) is not None


class Bench:
    """Runs the chosen sections, sharing our N-row run between them; collects a summary."""

    def __init__(self, args: argparse.Namespace, services: Services) -> None:
        self.args = args
        self.services = services
        self.tuning = Tuning(batch_size=args.batch_size, processes=args.processes,
                             threads=args.threads, max_inflight_rows=args.max_inflight,
                             pool_max_size=max(args.pool_max_size, args.threads))
        self.summary: list[str] = []
        self._ours: dict[int, OursRun] = {}

    def ours(self, rows: int) -> OursRun:
        """Our run at `rows` (at N: the median of --repeats runs, by warm rows/s)."""
        if rows not in self._ours:
            repeats = self.args.repeats if rows == self.args.rows else 1
            self._ours[rows] = self._median([self._ours_once(rows) for _ in range(repeats)])
        return self._ours[rows]

    def _ours_once(self, rows: int) -> OursRun:
        run = run_ours(self.services, rows, self.tuning)
        p = run.progress
        print(f"  ours: {rows} rows: cold {p.cold():,.0f} rows/s (init + workers start"
              f" + tick: {p.done_at - p.cold_start:.1f} s), warm {p.warm():,.0f} rows/s"
              f" (from tick launch, workers up: {p.done_at - p.started:.1f} s, first"
              f" vector after {p.first_vector_after():.1f} s), steady"
              f" {fmt_rate(p.steady())}; {run.requests} provider requests, statuses"
              f" {run.status_counts}", flush=True)
        print(f"        {run.cpu} from tick launch to the last vector; the bench's"
              f" {len(p.samples)} progress polls took {p.poll_seconds:.1f} s of it", flush=True)
        return run

    @staticmethod
    def _median(runs: list[OursRun]) -> OursRun:
        """The run with the median warm rate; memory peaks are the highest of all runs."""
        chosen = sorted(runs, key=lambda r: r.progress.warm())[len(runs) // 2]
        chosen.peak_rss_single = max(r.peak_rss_single for r in runs)
        chosen.peak_rss_total = max(r.peak_rss_total for r in runs)
        return chosen

    def ceiling(self) -> None:
        """Rounds of (every raw write strategy, then ours), so that both sides of each
        ratio ran within a minute of each other: this machine's speed drifts by tens of
        percent over minutes. The median round counts."""
        rows = self.args.rows
        cores = os.cpu_count() or 1
        rounds: list[tuple[CeilingRun, OursRun]] = []
        postgres: list[tuple[float, float, float]] = []  # raw, raw + state rows, ours
        for number in range(1, self.args.repeats + 1):
            print(f"  -- round {number} of {self.args.repeats}", flush=True)
            writes = run_ceiling(self.services, rows, self.tuning)
            for write in writes:
                print(f"  raw write, {write.strategy}: {rows} rows in {write.seconds:.2f} s:"
                      f" {write.rate:,.0f} rows/s; {write.cpu}", flush=True)
            # Not a ceiling: the fastest strategy plus pgreembed's state row per vector,
            # which tells how much of our Postgres CPU is that bookkeeping.
            [booked] = run_ceiling(self.services, rows, self.tuning, strategies={
                f"{writes[0].strategy} + a state row per vector": ceiling_strategies(
                    self.tuning.batch_size, cores)[writes[0].strategy]}, with_state_row=True)
            print(f"  not a ceiling, {booked.strategy}: {rows} rows"
                  f" in {booked.seconds:.2f} s: {booked.rate:,.0f} rows/s; {booked.cpu}",
                  flush=True)
            ours = self._ours_once(rows)
            rounds.append((writes[0], ours))
            postgres.append((writes[0].cpu_used["postgres"], booked.cpu_used["postgres"],
                             ours.cpu_used["postgres"]))
            print(f"  round {number}: ours/ceiling warm {ours.progress.warm() / writes[0].rate:.2f}"
                  f" (ceiling: {writes[0].strategy})", flush=True)
        ceiling, ours = sorted(rounds, key=lambda r: r[1].progress.warm() / r[0].rate
                               )[len(rounds) // 2]
        self._ours.setdefault(rows, self._median([r[1] for r in rounds]))
        p = ours.progress
        steady = p.steady()
        print(f"  the median round counts: ceiling {ceiling.rate:,.0f} rows/s ({ceiling.strategy}),"
              f" ours warm {p.warm():,.0f} rows/s")
        # What this machine allows at best: the provider stand-in, Postgres, Redis and the
        # tick share the cores with the workers; with workers that cost nothing, the
        # other CPU seconds measured in our run still need this much wall time.
        others = sum(v for k, v in ours.cpu_used.items() if k != "workers")
        bound = rows / (others / cores)
        print(f"  context: without any worker CPU, the rest of our run's CPU ({others:.1f} s on"
              f" {cores} cores) would allow at most {bound:,.0f} rows/s ="
              f" {bound / ceiling.rate:.2f} x the ceiling")
        ratios = (f"cold {p.cold() / ceiling.rate:.2f}, warm {p.warm() / ceiling.rate:.2f},"
                  f" steady {'n/a' if steady is None else f'{steady / ceiling.rate:.2f}'}")
        print(f"  ours/ceiling: {ratios}")
        raw_pg, booked_pg, ours_pg = (statistics.median(r[i] for r in postgres)
                                      for i in range(3))
        print(f"  Postgres CPU s per {rows} rows (median of {len(postgres)} rounds): raw write"
              f" {raw_pg:.1f}, raw write + state rows {booked_pg:.1f}"
              f" ({booked_pg / raw_pg:.2f}x), ours {ours_pg:.1f} ({ours_pg / raw_pg:.2f}x of"
              f" the raw write, {ours_pg / booked_pg:.2f}x of the raw write + state rows)")
        self.summary.append(f"ceiling    raw write {ceiling.rate:,.0f} rows/s; ours/ceiling"
                            f" {ratios} (target >= 0.7); Postgres CPU ours/raw"
                            f" {ours_pg / raw_pg:.2f}x, ours/(raw + state rows)"
                            f" {ours_pg / booked_pg:.2f}x")

    def indexed(self) -> None:
        """Per index, raw writes then ours on the same rows; the unindexed pair last."""
        rows = self.args.indexed_rows
        cases = []
        for index in [*[i.strip() for i in self.args.indexes.split(",") if i.strip()], None]:
            print(f"  -- {index or 'no index'}: {rows} rows", flush=True)
            cases.append(measure_indexed(self.services, rows, self.tuning, index))
        for case in cases:
            print(f"  {case.line()}")
            self.summary.append(f"indexed    {case.line()}"
                                + (" (target >= 0.9)" if case.index else ""))

    def sidepath(self) -> None:
        rows = self.args.indexed_rows
        print(f"  -- backlog: {rows} rows without a vector under HNSW (an initial backfill,"
              " a bulk import)", flush=True)
        backlog = measure_backlog(self.services, rows, self.tuning)
        print(f"  {backlog.summary()}")
        self.summary.append(f"sidepath   {backlog.summary()}")
        print(f"  -- model change: {rows} rows embedded by {self.services.model} under HNSW,"
              " re-embedded with another model of the same size", flush=True)
        result = measure_side_path(self.services, rows, self.tuning)
        speedup = result.direct_seconds / result.side_seconds
        crossover = result.crossover_rows()
        where = ("never (filling the side column is not cheaper per row)" if crossover is None
                 else f"{crossover:,.0f} rows = {100 * crossover / rows:.0f}% of this"
                      f" {rows}-row table")
        print(f"  side column / direct: {speedup:.2f}x faster end to end")
        print(f"  crossover (side column wins above this backlog): {where}")
        self.summary.append(f"sidepath   model change of {rows} filled rows under HNSW: direct"
                            f" {result.direct_seconds:.0f} s, side column"
                            f" {result.side_seconds:.0f} s = {speedup:.2f}x; crossover {where}")

    def applatency(self) -> None:
        a = self.args
        common = dict(seconds=a.app_seconds, rate=a.app_rate, clients=a.app_clients)
        rows = a.indexed_rows
        tuning = dataclasses.replace(self.tuning, batch_size=a.app_batch_size)
        print(f"  app: pgbench -R {a.app_rate:g} -c {a.app_clients}, {a.app_seconds:g} s per"
              f" phase; backfill: {rows} rows re-embedded in place, {tuning.describe()}")
        idle = run_phase(self.services, rows, tuning, "idle", backfill=False, **common)
        print(f"  {idle.line()}", flush=True)
        full = run_phase(self.services, rows, tuning, "backfill, no throttle",
                         backfill=True, **common)
        print(f"  {full.line(idle)}", flush=True)
        # The cap is the unthrottled rate: only the adaptive mode slows the backfill down;
        # its bound is 1.5x the app's idle median (the probe is the app's own search).
        config = throttle_config(max(1, int(full.backfill_rows / full.seconds)),
                                 1.5 * statistics.median(idle.latencies_ms))
        print(f"  throttle: {' '.join(config.split())}")
        throttled = run_phase(self.services, rows, tuning, "backfill, throttle on",
                              backfill=True, throttle=config, **common)
        print(f"  {throttled.line(idle)}", flush=True)
        self.summary.append(f"applatency p99 idle {idle.percentile(99):.1f} ms, backfill"
                            f" {full.percentile(99) / idle.percentile(99):.1f}x idle,"
                            f" throttled {throttled.percentile(99) / idle.percentile(99):.1f}x"
                            f" idle at {throttled.backfill_rows / throttled.seconds:,.0f} rows/s"
                            " (target <= 2x)")

    def pgai(self) -> None:
        rows = self.args.rows
        if pgai_version() is None:
            print("  pgai: not installed (pip install -e '.[bench]'); section skipped")
            self.summary.append("pgai       not run: pgai is not installed")
            return
        runs = [r.strip() for r in self.args.pgai_runs.split(",") if r.strip()]
        results = []
        for label in runs:
            if label == "default":
                result = run_pgai(self.services, rows, "default")
            elif label == "tuned":
                result = run_pgai(self.services, rows, "tuned", workers=self.tuning.processes,
                                  batch_size=self.tuning.batch_size,
                                  concurrency=min(10, self.tuning.threads))
            else:
                raise SystemExit(f"--pgai-runs: unknown configuration {label!r}")
            p = result.progress
            print(f"  pgai {label} ({result.workers} worker(s) --once, batch_size"
                  f" {result.batch_size or 'default (50)'}, concurrency"
                  f" {result.concurrency or 'default (1)'}): cold {p.cold():,.0f} rows/s"
                  f" (install + create_vectorizer + workers: {p.done_at - p.cold_start:.1f} s),"
                  f" warm {p.warm():,.0f} rows/s (from worker launch), steady"
                  f" {fmt_rate(p.steady())}; {result.requests} provider requests", flush=True)
            print(f"        {result.cpu} from worker launch to exit", flush=True)
            results.append(result)
        ours = self.ours(rows).progress
        best_ratios = ""
        for result in sorted(results, key=lambda r: r.progress.cold()):
            theirs = result.progress
            steady_ours, steady_theirs = ours.steady(), theirs.steady()
            steady = ("n/a" if steady_ours is None or steady_theirs is None
                      else f"{steady_ours / steady_theirs:.2f}")
            best_ratios = (f"cold {ours.cold() / theirs.cold():.2f}, warm"
                           f" {ours.warm() / theirs.warm():.2f}, steady {steady}")
            print(f"  ours/pgai-{result.label}: {best_ratios}")
        best = max(results, key=lambda r: r.progress.cold())
        self.summary.append(f"pgai       ours/pgai ({best.label}, the faster pgai here):"
                            f" {best_ratios} (target >= 3)")

    def memory(self) -> None:
        rows = self.args.rows
        small = self.ours(rows)
        large = self.ours(4 * rows)
        for run in (small, large):
            print(f"  {run.rows:>7} rows: worker peak RSS {run.peak_rss_single / MB:.0f} MB per"
                  f" process, {run.peak_rss_total / MB:.0f} MB for the whole dramatiq tree")
        ratio = large.peak_rss_single / small.peak_rss_single
        print(f"  4N/N = {ratio:.2f} (per process), "
              f"{large.peak_rss_total / small.peak_rss_total:.2f} (tree)")
        self.summary.append(f"memory     worker peak RSS {small.peak_rss_single / MB:.0f} MB at"
                            f" {rows} rows, {large.peak_rss_single / MB:.0f} MB at {4 * rows}:"
                            f" 4N/N = {ratio:.2f} (target: flat)")

    def freshness(self) -> None:
        result = run_freshness(self.services, self.tuning, self.args.fresh_rate,
                               self.args.fresh_seconds)
        p50, p99 = result.percentile(50), result.percentile(99)
        print(f"  {len(result.latencies)} rows at {result.rate:g}/s for {result.seconds:g} s:"
              f" insert -> embedded p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms,"
              f" max {max(result.latencies) * 1000:.0f} ms (after warm-up rows; the first"
              f" row after the workers started took {result.cold_start:.1f} s)")
        self.summary.append(f"freshness  p50 {p50:.2f} s, p99 {p99:.2f} s at"
                            f" {result.rate:g} rows/s (targets < 1 s, < 5 s)")

    def ratelimit(self) -> None:
        client = client_budget_supported() and not self.args.no_client_budget
        result = run_ratelimit(self.services, self.tuning, self.args.tpm, self.args.windows,
                               client)
        budget = "target tokens_per_minute set to the same budget" if client else (
            "no client-side budget" + ("" if self.args.no_client_budget else
                                       " (this version has none)"))
        print(f"  budget {result.tokens_per_minute:,} tokens/min, {result.windows} x 60 s from"
              f" the first request, {result.rows} rows waiting ({budget}):")
        admitted = max(1, int(result.status_counts.get("200", 0)))
        per_request = result.tokens_in_window / admitted
        unused = result.tokens_per_minute * result.windows - result.tokens_in_window
        print(f"  admitted {result.tokens_in_window:,} tokens = {100 * result.fraction:.1f}% of"
              f" the budget (unused: {unused / per_request:.2f} of one {per_request:,.0f}-token"
              f" request); {result.rejected} responses were 429 ({result.requests}"
              f" requests, statuses {result.status_counts})")
        self.summary.append(f"ratelimit  {100 * result.fraction:.1f}% of"
                            f" {result.tokens_per_minute:,} tokens/min used,"
                            f" {result.rejected} x 429 (target >= 95%, no storm)")

    def profile(self) -> None:
        rows = self.args.rows
        output = self.args.profile_output or (self.services.workdir / "worker-profile.txt")
        run = run_ours(self.services, rows, self.tuning, wrapper=profiling.wrapper(output))
        print(f"  profiled run: {rows} rows at {run.progress.warm():,.0f} rows/s from tick launch"
              f" (py-spy attached, 100 Hz)")
        result = profiling.parse(output)
        total = result.samples + result.startup_samples
        print(f"  {total} CPU samples over all worker processes, {result.startup_samples}"
              f" ({100 * result.startup_samples / max(1, total):.0f}%) in start-up work on the"
              f" first message (imports, provider client, tokenizer), left out below.")
        print("  Top self time (steady state):")
        print("\n".join(result.table(result.self_time, 15)))
        print("  Top inclusive time, our code (steady state):")
        print("\n".join(result.table(result.inclusive, 15, only_ours=True)))
        if self.args.profile_output:
            print(f"  raw profile kept in {output}")

    def run(self, name: str) -> None:
        section: Callable[[], None] = getattr(self, name)
        print(f"\n== {name}", flush=True)
        started = time.monotonic()
        try:
            section()
        except Exception as exc:  # noqa: BLE001 - report it and go on with the others
            print(f"  {name} FAILED: {type(exc).__name__}: {exc}", flush=True)
            self.summary.append(f"{name:<10} FAILED: {type(exc).__name__}: {exc}"[:300])
        print(f"  ({name} took {time.monotonic() - started:.0f} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    model = f"fake-{args.dims}"
    services = Services(model, args.dims)
    started = time.monotonic()
    try:
        services.start()
        bench = Bench(args, services)
        print(f"machine: {_machine()}")
        print(f"services: {_server_versions(services)}, local OpenAI-compatible server"
              f" (zero latency, in the benchmark process)")
        print(f"data: N={args.rows} rows of ~100 tokens, model {model} ({args.dims} dims);"
              f" token counting with tiktoken cl100k_base:"
              f" {'yes' if tiktoken_cache_dir() else 'no (byte upper bound)'}")
        print(f"ours: {bench.tuning.describe()}", flush=True)
        for name in SECTIONS:
            if name in args.only:
                bench.run(name)
        print(f"\n== summary ({time.monotonic() - started:.0f} s in all; command:"
              f" python -m bench.run {' '.join(argv if argv is not None else sys.argv[1:])})")
        for line in bench.summary:
            print(f"  {line}")
    finally:
        services.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
