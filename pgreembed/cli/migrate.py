"""`pgreembed migrate ...`: the runbook steps of a re-embedding migration, one command each."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from typing import Any

from pgreembed.config import Budget, load_settings
from pgreembed.distances import DISTANCE_ALIASES, DISTANCES
from pgreembed.errors import ConfigError
from pgreembed.migrations import index as indexing
from pgreembed.migrations import lifecycle, plan, progress, swap
from pgreembed.store.table_lock import DEFAULT_LOCK_TIMEOUT_MS, DEFAULT_WAIT_SECONDS, LockPolicy


def _human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if count < 1024:
            return f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} PB"


def _bar(done: int, total: int, width: int = 30) -> str:
    filled = int(width * done / total) if total else width
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def usd(amount: float) -> str:
    """Dollars with the cents, or as many digits as a sub-cent amount needs ($0.0002)."""
    if amount == 0 or abs(amount) >= 0.01:
        return f"${amount:,.2f}"
    digits = f"{amount:.6f}".rstrip("0")
    return "$" + (digits if len(digits.split(".")[1]) >= 2 else f"{amount:.2f}")


def progress_line(pr: progress.Progress) -> str:
    eta = "?" if pr.eta_seconds is None else f"{pr.eta_seconds:.0f}s"
    return (f"{_bar(pr.done, pr.total)} {pr.done}/{pr.total} rows, {pr.failed} failed,"
            f" {pr.rate_per_second:.1f} rows/s, ETA {eta}{' (paused)' if pr.paused else ''}")


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    target = settings.target(args.target)
    step = args.step
    if args.derive is not None:
        return _derive(settings, target, args)
    if step in ("plan", "start") and (not args.model or not args.dimensions):
        raise ConfigError(f"migrate {step}: --model and --dimensions are required")
    budget = Budget(args.requests_per_minute, args.tokens_per_minute)
    if args.spend_cap is not None and step not in ("start", "resume"):
        raise ConfigError(f"migrate {step}: --spend-cap is an option of start and resume")
    if budget and step not in ("plan", "start"):
        raise ConfigError(f"migrate {step}: --requests-per-minute/--tokens-per-minute are"
                          " options of plan and start")
    if step == "plan":
        p = plan.plan(settings, target, args.provider, args.model, args.dimensions,
                         budget=budget)
        cost = "n/a (unknown price)" if p.cost_usd is None else f"${p.cost_usd:,.2f}"
        about = "~" if p.rows_estimated else ""
        print(f"rows: {about}{p.rows} ({about}{p.rows_without_text} without text,"
              f" {about}{p.distinct_texts} distinct texts to embed"
              f"{'; estimated from a sample of the table' if p.rows_estimated else ''})")
        how = ("counted" if p.tokens_exact else "extrapolated from a sample") + (
            "" if p.tokens_counted_by_tokenizer else
            " as UTF-8 bytes, an upper bound: no tokenizer offline (TIKTOKEN_CACHE_DIR)")
        print(f"tokens: {'' if p.tokens_exact else '~'}{p.tokens:,} ({how})")
        print(f"estimated cost: {cost}")
        if p.minutes_at_rate_limit is None:
            print(f"estimated time: no rate limit configured for {args.model}"
                  " (--tokens-per-minute / --requests-per-minute, or [rate_limits] in the"
                  " config): bounded by the workers")
        else:
            limits = ", ".join(f"{value:,} {unit}/min" for value, unit in (
                (p.budget.requests_per_minute, "requests"),
                (p.budget.tokens_per_minute, "tokens")) if value)
            print(f"estimated time at {args.model}'s rate limit ({limits}):"
                  f" {p.minutes_at_rate_limit:,.1f} min")
        print(f"new column: {p.column} {p.column_type}, ~{_human_bytes(p.storage_bytes)}")
        print("SQL:")
        for statement in p.statements:
            print(f"  {statement}")
        for note in p.notes:
            print(f"note: {note}")
        for blocker in p.blockers:
            print(f"BLOCKER: {blocker}")
        return 1 if p.blockers else 0
    if step == "start":
        slot = lifecycle.start(settings, target, args.provider, args.model, args.dimensions,
                             spend_cap_usd=args.spend_cap and args.spend_cap.usd,
                             batch_api=args.batch_api, budget=budget,
                             policy=_lock_policy(args))
        if args.batch_api:
            print("batch mode: run `pgreembed migrate batch` (from cron, or with --wait)")
        print(f"migration started: column {slot.vector_column} ({slot.model_key}) is being"
              " filled by the scheduler and workers")
    elif step == "pause":
        lifecycle.pause(settings, target)
        print(f"migration of {target.name} paused")
    elif step == "resume":
        cap = lifecycle.KEEP_CAP if args.spend_cap is None else args.spend_cap.usd
        lifecycle.resume(settings, target, cap)
        print(f"migration of {target.name} resumed")
    elif step == "cancel":
        lifecycle.cancel(settings, target, _lock_policy(args))
        print(f"migration of {target.name} cancelled; the new column is dropped")
    elif step == "index":
        name = indexing.build_index(settings, target, method=args.method,
                                   distance=args.distance, lists=args.lists,
                                   m=args.m, ef_construction=args.ef_construction,
                                   maintenance_work_mem=args.maintenance_work_mem)
        print(f"index {name} is valid")
    elif step == "compare":
        return _compare(settings, target, args)
    elif step in ("swap", "rollback"):
        comparison = _show_last_comparison(settings, target) if step == "swap" else None
        result = swap.swap(settings, target, rollback=step == "rollback",
                              catch_up_timeout=args.timeout,
                              max_unsearchable=args.max_unsearchable,
                              accept_failed=args.accept_failed, policy=_lock_policy(args),
                              on_wait=_print_wait)
        if args.json:
            print(json.dumps({"step": step, "attempts": result.attempts,
                              "pause_ms": round(result.pause_seconds * 1000, 1),
                              "seconds": round(result.waited_seconds, 3),
                              "unsearchable": result.unsearchable,
                              **({"comparison": comparison} if step == "swap" else {})}))
        else:
            print(f"{step} done in {result.pause_seconds * 1000:.0f} ms of table lock"
                  f" (attempt {result.attempts}, {result.waited_seconds:.1f} s in all;"
                  f" {result.unsearchable} rows to embed for the new live model)")
    elif step == "batch":
        return _batch(settings, target, args)
    elif step == "finalize":
        lifecycle.finalize(settings, target, _lock_policy(args))
        print(f"migration of {target.name} finalized; the previous column is dropped")
    elif step == "status":
        pr = progress.progress(settings, target)
        info: dict[str, Any] = {
            "migration": pr.migration.id, "phase": pr.migration.phase, "column": pr.column,
            "model": pr.model, "total": pr.total, "done": pr.done, "failed": pr.failed,
            "rate_per_second": round(pr.rate_per_second, 1), "eta_seconds": pr.eta_seconds,
            "paused": pr.paused,
            "indexes": [{"name": i.name, "valid": i.valid} for i in pr.indexes],
            "tokens": pr.tokens, "spend_usd": round(pr.spend_usd, 6),
            "spend_cap_usd": pr.spend_cap_usd, "paused_by": pr.paused_by,
        }
        if args.json:
            print(json.dumps(info, indent=2))
        else:
            print(f"migration {pr.migration.id} ({pr.migration.phase}"
                  f"{', paused' if pr.paused else ''}): {pr.column} <- {pr.model}")
            print(progress_line(pr))
            cap = "" if pr.spend_cap_usd is None else f" of a {usd(pr.spend_cap_usd)} cap"
            print(f"tokens sent: {pr.tokens:,}, spend ${pr.spend_usd:,.4f}{cap}")
            if pr.paused_by == "spend_cap":
                print("paused by the spend cap: raise it with `migrate resume --spend-cap USD`"
                      " (or --spend-cap none)")
            for index in pr.indexes:
                print(f"index {index.name}: {'valid' if index.valid else 'INVALID'}")
    return 0


def _compare(settings: Any, target: Any, args: argparse.Namespace) -> int:
    from pgreembed.migrations.compare import compare, read_queries, report_lines

    if args.queries and args.sample:
        raise ConfigError("migrate compare: give --queries FILE or --sample N, not both")
    # With --json, stdout is the JSON document alone: the spend notice goes to stderr.
    notices = sys.stderr if args.json else sys.stdout
    report = compare(settings, target, texts=read_queries(args.queries) if args.queries
                     else None, sample=args.sample, k=args.k,
                     announce=lambda line: print(line, file=notices, flush=True))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print("\n".join(report_lines(report)))
    return 0


def _show_last_comparison(settings: Any, target: Any) -> dict[str, Any] | None:
    """Before a swap: the last `migrate compare` of this migration, or a warning."""
    from pgreembed.migrations.compare import last_comparison, report_lines
    from pgreembed.store.pool import connect

    with connect(settings.database_url, autocommit=True) as conn:
        found = last_comparison(conn, target)
    out = sys.stderr  # advice next to the swap; stdout stays the swap's own result
    if found is None:
        print(f"warning: no `pgreembed migrate compare --target {target.name}` was run for this"
              " migration: the new model's retrieval quality and its index's recall are"
              " unmeasured", file=out, flush=True)
    else:
        print("\n".join(report_lines(found)), file=out, flush=True)
    return found


def _derive(settings: Any, target: Any, args: argparse.Namespace) -> int:
    """`plan|start --derive SPEC`: a migration made in SQL from the live vectors, $0."""
    from pgreembed.migrations import derive

    if args.step not in ("plan", "start"):
        raise ConfigError(f"migrate {args.step}: --derive is an option of plan and start")
    if args.model or args.dimensions or args.batch_api or args.spend_cap is not None:
        raise ConfigError("migrate --derive: the model and size come from the live column"
                          " and the spec (no --model, --dimensions, --batch-api, --spend-cap)")
    dimensions = derive.parse_dimensions(args.derive)
    live = derive.live_slot(settings, target)
    derive.check_shortenable(live, dimensions)
    if args.step == "plan":
        p = plan.plan(settings, target, live.provider, live.model, dimensions)
        saved = derive.storage_saved(p.rows, live, dimensions)
        if args.json:
            print(json.dumps({"rows": p.rows, "derived_from": live.model_key,
                              "provider_inputs": 0, "cost_usd": 0.0, "column": p.column,
                              "column_type": p.column_type, "storage_bytes": p.storage_bytes,
                              "storage_saved_bytes": saved}))
            return 0
        print(f"rows: {p.rows}; derived in SQL from {live.model_key}: no provider call,"
              " estimated cost: $0.00 (rows written meanwhile without a live vector are"
              " embedded by the provider at the new size)")
        print(f"new column: {p.column} {p.column_type}, ~{_human_bytes(p.storage_bytes)};"
              f" saves ~{_human_bytes(saved)} over the live column")
        return 0
    slot, report = derive.start(settings, target, args.derive, policy=_lock_policy(args))
    print(f"derived migration: column {slot.vector_column} ({slot.model_key}) filled from"
          f" {live.model_key}: {report.derived} rows derived in {report.passes} passes,"
          f" {report.left_to_provider} left to the provider; next: migrate index, swap")
    return 0


def _lock_policy(args: argparse.Namespace) -> LockPolicy:
    return LockPolicy(lock_timeout_ms=args.lock_timeout_ms, wait_seconds=args.lock_wait,
                      terminate_idle_after=args.terminate_idle_after)


_last_wait_print = [0.0]


def _print_wait(wait: swap.SwapWait) -> None:
    """A line every few seconds while a swap waits for the incoming column."""
    if wait.seconds - _last_wait_print[0] >= 2.0 or _last_wait_print[0] == 0.0:
        _last_wait_print[0] = max(wait.seconds, 1e-9)
        print(f"waiting {wait.seconds:.0f} s: {wait.unsearchable} searchable rows not yet"
              f" embedded in the incoming column (allowed {wait.allowed})",
              file=sys.stderr, flush=True)


def _batch(settings: Any, target: Any, args: argparse.Namespace) -> int:
    from pgreembed.migrations.batch_api import step as batch_step

    deadline = time.monotonic() + args.timeout
    while True:
        result = batch_step(settings, target)
        print(f"batch: {result.submitted_inputs} inputs submitted, {result.completed_jobs} jobs"
              f" completed ({result.written} rows written, {result.failed} failed),"
              f" {result.open_jobs} open", flush=True)
        if result.back_to_queue:
            print("batch: all jobs done; remaining rows go through the normal queue")
            return 0
        if not args.wait:
            return 0
        if time.monotonic() > deadline:
            print("batch: --timeout reached with jobs still open (run again later)")
            return 3
        time.sleep(args.poll)


@dataclass(frozen=True)
class SpendCap:
    usd: float | None  # None: `--spend-cap none`, no cap


def _spend_cap(text: str) -> SpendCap:
    if text.strip().lower() == "none":
        return SpendCap(None)
    try:
        usd = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an amount in USD or 'none', got {text!r}"
                                         ) from None
    if not usd > 0 or usd == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive amount in USD, got {text!r}")
    return SpendCap(usd)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def register(sub: Any) -> None:
    """Add `migrate` with one sub-step per runbook step to the main parser."""
    parser = sub.add_parser("migrate", help="move a target to a new embedding model",
                            description=lifecycle.__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(handler=run)
    parser.add_argument("step", choices=["plan", "start", "status", "pause", "resume",
                                         "cancel", "index", "swap", "rollback", "finalize",
                                         "batch", "compare"])
    parser.add_argument("--target", required=True)
    parser.add_argument("--provider", default="openai", choices=["openai", "local"])
    parser.add_argument("--model", help="plan/start: the new model")
    parser.add_argument("--dimensions", type=int, help="plan/start: the new size")
    parser.add_argument("--json", action="store_true",
                        help="status/swap/rollback/compare: machine-readable")
    parser.add_argument("--spend-cap", type=_spend_cap, metavar="USD",
                        help="start: pause the migration once it has cost this much;"
                             " resume: raise it (or `none`: no cap)")
    parser.add_argument("--requests-per-minute", type=_positive_int, metavar="N",
                        help="start: the new model's request budget, shared by every worker"
                             " (recorded; plan: estimate with it)")
    parser.add_argument("--tokens-per-minute", type=_positive_int, metavar="N",
                        help="start: the new model's token budget, shared by every worker"
                             " (recorded; plan: estimate with it)")
    parser.add_argument("--method", choices=["hnsw", "ivfflat"],
                        help="index: default the live column's index method, else hnsw")
    parser.add_argument("--distance", choices=[*DISTANCES, *DISTANCE_ALIASES],
                        help="index: default the live column's index distance, else the"
                             " target's `distance`")
    parser.add_argument("--lists", type=int, help="ivfflat lists (default from row count)")
    parser.add_argument("--m", type=int, default=16, help="hnsw m")
    parser.add_argument("--ef-construction", type=int, default=64)
    parser.add_argument("--maintenance-work-mem", default="512MB")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="swap/rollback: seconds to wait for rows to catch up;"
                             " batch --wait: seconds to wait for jobs")
    parser.add_argument("--max-unsearchable", type=int,
                        default=swap.DEFAULT_MAX_UNSEARCHABLE, metavar="ROWS",
                        help="swap/rollback: go ahead when at most this many rows searchable now"
                             " have no vector in the incoming column yet (they are embedded"
                             " for the new live model seconds later)")
    parser.add_argument("--accept-failed", action="store_true",
                        help="swap/rollback: go ahead although some rows failed to embed in"
                             " the incoming column (they drop out of search)")
    parser.add_argument("--lock-timeout-ms", type=int, default=DEFAULT_LOCK_TIMEOUT_MS,
                        help="start/swap/rollback/cancel/finalize: longest wait of one lock attempt"
                             " (the app's queries queue behind it meanwhile)")
    parser.add_argument("--lock-wait", type=float, default=DEFAULT_WAIT_SECONDS, metavar="S",
                        help="start/swap/rollback/cancel/finalize: give up after retrying the lock"
                             " this long")
    parser.add_argument("--terminate-idle-after", type=float, metavar="S",
                        help="start/swap/rollback/cancel/finalize: after waiting S seconds for the"
                             " lock, end sessions idle in a transaction on the table for S"
                             " seconds or more (off by default)")
    parser.add_argument("--derive", metavar="dimensions:D",
                        help="plan/start: fill the new column from the live vectors in SQL,"
                             " no provider call (text-embedding-3-*: first D components,"
                             " renormalised)")
    parser.add_argument("--batch-api", action="store_true",
                        help="start: fill through the OpenAI Batch API (half price, <= 24 h)")
    parser.add_argument("--queries", metavar="FILE",
                        help="compare: query texts, one per line (default: --sample)")
    parser.add_argument("--sample", type=_positive_int, metavar="N",
                        help="compare: N rows' texts as self-retrieval queries (default 100)")
    parser.add_argument("--k", type=_positive_int, default=10,
                        help="compare: recall@k, overlap@k, self-recall@k (default 10)")
    parser.add_argument("--wait", action="store_true", help="batch: poll until jobs are done")
    parser.add_argument("--poll", type=float, default=30.0, help="batch --wait: seconds")
