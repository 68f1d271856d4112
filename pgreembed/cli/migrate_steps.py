"""What each `pgreembed migrate <step>` does with its parsed options: one handler per step."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from pgreembed.cli import migrate_rechunk
from pgreembed.cli.formatting import human_bytes as _human_bytes
from pgreembed.cli.migrate_derive import derive_step
from pgreembed.cli.migration_lines import migration_line
from pgreembed.cli.output import emit
from pgreembed.cli.progress import Progress
from pgreembed.config import Budget, Settings, Target, load_settings
from pgreembed.embedding.providers import require_credentials
from pgreembed.errors import EXIT_OK, EXIT_REFUSED, ConfigError, WaitTimeoutError
from pgreembed.migrations import disk, lifecycle, plan, progress, rechunk, swap
from pgreembed.migrations import index as indexing
from pgreembed.migrations.index_progress import IndexBuild
from pgreembed.store.table_lock import LockPolicy


def usd(amount: float) -> str:
    """Dollars with the cents, or as many digits as a sub-cent amount needs ($0.0002)."""
    if amount == 0 or abs(amount) >= 0.01:
        return f"${amount:,.2f}"
    digits = f"{amount:.6f}".rstrip("0")
    return "$" + (digits if len(digits.split(".")[1]) >= 2 else f"{amount:.2f}")


def target_of(args: argparse.Namespace) -> tuple[Settings, Target]:
    settings = load_settings(args.config)
    return settings, settings.target(args.target)


def _budget(args: argparse.Namespace) -> Budget:
    return Budget(args.requests_per_minute, args.tokens_per_minute)


def lock_policy(args: argparse.Namespace) -> LockPolicy:
    return LockPolicy(lock_timeout_ms=args.lock_timeout_ms, wait_seconds=args.lock_wait,
                      terminate_idle_after=args.terminate_idle_after)


def _require_model(args: argparse.Namespace, step: str) -> None:
    if not args.model or not args.dimensions:
        raise ConfigError(f"migrate {step}: --model and --dimensions are required"
                          " (or --derive dimensions:D|halfvec)")


def cmd_plan(args: argparse.Namespace) -> int:
    settings, target = target_of(args)
    if args.rechunk:
        return migrate_rechunk.plan_step(settings, target, args)
    if args.derive is not None:
        return derive_step(settings, target, args, "plan", None)
    _require_model(args, "plan")
    budget_bytes = None if args.disk_budget is None else disk.parse_size(args.disk_budget)
    p = plan.plan(settings, target, args.provider or target.provider, args.model,
                  args.dimensions,
                  budget=_budget(args), disk_budget=budget_bytes)
    code = EXIT_REFUSED if p.blockers else EXIT_OK
    if args.json:
        emit("migrate-plan", {
            "rows": p.rows, "rows_without_text": p.rows_without_text, "tokens": p.tokens,
            "rows_estimated": p.rows_estimated, "distinct_texts": p.distinct_texts,
            "tokens_counted_by_tokenizer": p.tokens_counted_by_tokenizer,
            "tokens_exact": p.tokens_exact, "cost_usd": p.cost_usd,
            "minutes_at_rate_limit": p.minutes_at_rate_limit,
            "requests_per_minute": p.budget.requests_per_minute,
            "tokens_per_minute": p.budget.tokens_per_minute,
            "storage_bytes": p.storage_bytes, "column": p.column,
            "column_type": p.column_type, "statements": p.statements,
            "blockers": p.blockers, "notes": p.notes,
            "app_objects": [d.as_dict() for d in p.app_objects],
            "disk": None if p.space is None else {
                "table_bytes": p.space.now, "peak_bytes": p.space.peak,
                "peak_extra_bytes": p.space.peak_extra,
                "after_finalize_bytes": p.space.after_finalize,
                "live_after_finalize_bytes": p.space.live_after_finalize,
                "disk_budget_bytes": budget_bytes}})
        return code
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
    if p.space is not None:
        _print_disk(p.space, budget_bytes)
    print("SQL:")
    for statement in p.statements:
        print(f"  {statement}")
    for decision in p.app_objects:
        print(f"app object: {decision.line()}")
    for note in p.notes:
        print(f"note: {note}")
    for blocker in p.blockers:
        print(f"BLOCKER: {blocker}")
    return code


def _print_disk(d: disk.DiskEstimate, budget: int | None) -> None:
    within = ("" if budget is None else
              f", {'within' if d.peak_extra <= budget else 'OVER'} --disk-budget"
              f" {_human_bytes(budget)}")
    print(f"disk: the table (heap + TOAST + indexes) is {_human_bytes(d.now)} now;"
          f" ~{_human_bytes(d.peak)} at the peak, from start to finalize"
          f" (+{_human_bytes(d.peak_extra)}{within})")
    print(f"after finalize + VACUUM: ~{_human_bytes(d.after_finalize)} on disk, of which"
          f" ~{_human_bytes(d.live_after_finalize)} data; the rest is free space the table"
          " (and the next migration) reuses; `pgreembed migrate compact` after finalize"
          " returns it to the OS (costly: see its help)")


def cmd_start(args: argparse.Namespace) -> int:
    settings, target = target_of(args)
    if args.rechunk:
        return migrate_rechunk.start_step(settings, target, args, lock_policy(args))
    if args.derive is not None:
        return derive_step(settings, target, args, "start", lock_policy(args))
    _require_model(args, "start")
    provider = args.provider or target.provider
    require_credentials(settings, provider)
    slot = lifecycle.start(settings, target, provider, args.model, args.dimensions,
                           spend_cap_usd=args.spend_cap and args.spend_cap.usd,
                           batch_api=args.batch_api, budget=_budget(args),
                           policy=lock_policy(args))
    if args.batch_api:
        print("batch mode: run `pgreembed migrate batch` (from cron, or with --wait)")
    print(f"migration started: column {slot.vector_column} ({slot.model_key}) is being"
          " filled by the scheduler and workers")
    decisions, notes = lifecycle.app_objects_report(settings, target)
    for decision in decisions:
        print(f"app object: {decision.line()}")
    for note in notes:
        print(f"note: {note}")
    return EXIT_OK


def cmd_pause(args: argparse.Namespace) -> int:
    settings, target = target_of(args)
    lifecycle.pause(settings, target)
    print(f"migration of {target.name} paused")
    return EXIT_OK


def cmd_resume(args: argparse.Namespace) -> int:
    settings, target = target_of(args)
    cap = lifecycle.KEEP_CAP if args.spend_cap is None else args.spend_cap.usd
    lifecycle.resume(settings, target, cap)
    print(f"migration of {target.name} resumed")
    return EXIT_OK


def _already_done(step: str) -> None:
    print(f"{step} was already done (committed by an earlier run): nothing to do")


def cmd_cancel(args: argparse.Namespace) -> int:
    settings, target = target_of(args)
    if rechunk.is_rechunk(settings, target):
        return migrate_rechunk.end_step(settings, target, "cancel", lock_policy(args))
    if lifecycle.cancel(settings, target, lock_policy(args)).already_done:
        _already_done("cancel")
    else:
        print(f"migration of {target.name} cancelled; the new column is dropped")
    return EXIT_OK


def cmd_finalize(args: argparse.Namespace) -> int:
    settings, target = target_of(args)
    if rechunk.is_rechunk(settings, target):
        return migrate_rechunk.end_step(settings, target, "finalize", lock_policy(args))
    if lifecycle.finalize(settings, target, lock_policy(args)).already_done:
        _already_done("finalize")
    else:
        print(f"migration of {target.name} finalized; the previous column is dropped")
    return EXIT_OK


def cmd_index(args: argparse.Namespace) -> int:
    settings, target = target_of(args)
    with Progress("index", "tuples") as bar:
        def show(build: IndexBuild) -> None:
            bar.update(build.done, build.total, f"{build.phase} ({build.unit})", build.phase)

        name = indexing.build_index(settings, target, method=args.method,
                                    distance=args.distance, lists=args.lists, m=args.m,
                                    ef_construction=args.ef_construction,
                                    maintenance_work_mem=args.maintenance_work_mem,
                                    parallel_workers=args.parallel_workers, on_progress=show)
    print(f"index {name} is valid")
    return EXIT_OK


def cmd_swap(args: argparse.Namespace) -> int:
    settings, target = target_of(args)
    if rechunk.is_rechunk(settings, target):
        return migrate_rechunk.swap_step(settings, target, args, lock_policy(args))
    step = args.step
    comparison = _show_last_comparison(settings, target) if step == "swap" else None
    with Progress(f"{step}: catching up", "rows", as_json=args.json) as bar:
        first: list[int] = []

        def show(wait: swap.SwapWait) -> None:
            first.append(wait.unsearchable)
            # Done: rows embedded in the incoming column since the wait began.
            bar.update(max(first[0] - wait.unsearchable, 0), first[0] - wait.allowed,
                       f"{wait.unsearchable} left, {wait.allowed} allowed")

        result = swap.swap(settings, target, rollback=step == "rollback",
                           catch_up_timeout=args.timeout,
                           max_unsearchable=args.max_unsearchable,
                           accept_failed=args.accept_failed, policy=lock_policy(args),
                           on_wait=show)
    if args.json:
        emit(f"migrate-{step}", {
            "step": step, "attempts": result.attempts,
            "pause_ms": round(result.pause_seconds * 1000, 1),
            "seconds": round(result.waited_seconds, 3), "unsearchable": result.unsearchable,
            "already_done": result.already_done,
            "app_objects": [d.as_dict() for d in result.kept],
            **({"comparison": comparison} if step == "swap" else {})})
    elif result.already_done:
        _already_done(step)
    else:
        print(f"{step} done in {result.pause_seconds * 1000:.0f} ms of table lock"
              f" (attempt {result.attempts}, {result.waited_seconds:.1f} s in all;"
              f" {result.unsearchable} rows to embed for the new live model)")
        for decision in result.kept:
            print(f"kept on its column: {decision.obj.kind} {decision.obj.name}"
                  f" ({decision.action})")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    settings, target = target_of(args)
    pr = progress.progress(settings, target)
    info: dict[str, Any] = {
        "migration": pr.migration.id, "phase": pr.migration.phase, "column": pr.column,
        "model": pr.model, "total": pr.total, "done": pr.done, "failed": pr.failed,
        "rate_per_second": round(pr.rate_per_second, 1), "eta_seconds": pr.eta_seconds,
        "paused": pr.paused,
        "indexes": [{"name": i.name, "valid": i.valid} for i in pr.indexes],
        "tokens": pr.tokens, "spend_usd": round(pr.spend_usd, 6),
        "spend_cap_usd": pr.spend_cap_usd, "paused_by": pr.paused_by,
        "estimated": pr.estimated,
    }
    if args.json:
        emit("migrate-status", info)
        return EXIT_OK
    print(f"migration {pr.migration.id} ({pr.migration.phase}"
          f"{', paused' if pr.paused else ''}): {pr.column} <- {pr.model}")
    print(migration_line(pr))
    cap = "" if pr.spend_cap_usd is None else f" of a {usd(pr.spend_cap_usd)} cap"
    print(f"tokens sent: {pr.tokens:,}, spend ${pr.spend_usd:,.4f}{cap}")
    if pr.paused_by == "spend_cap":
        print("paused by the spend cap: raise it with `migrate resume --spend-cap USD`"
              " (or --spend-cap none)")
    for index in pr.indexes:
        print(f"index {index.name}: {'valid' if index.valid else 'INVALID'}")
    return EXIT_OK


def cmd_compare(args: argparse.Namespace) -> int:
    from pgreembed.migrations.compare import compare, read_queries, report_lines

    settings, target = target_of(args)
    if args.queries and args.sample:
        raise ConfigError("migrate compare: give --queries FILE or --sample N, not both")
    # With --json, stdout is the JSON document alone: the spend notice goes to stderr.
    notices = sys.stderr if args.json else sys.stdout
    report = compare(settings, target, texts=read_queries(args.queries) if args.queries
                     else None, sample=args.sample, k=args.k,
                     announce=lambda line: print(line, file=notices, flush=True))
    if args.json:
        emit("migrate-compare", report)
    else:
        print("\n".join(report_lines(report)))
    return EXIT_OK


def _show_last_comparison(settings: Settings, target: Target) -> dict[str, Any] | None:
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


def cmd_batch(args: argparse.Namespace) -> int:
    from pgreembed.migrations.batch_api import step as batch_step

    settings, target = target_of(args)
    deadline = time.monotonic() + args.timeout
    with Progress("batch jobs", "jobs") as bar:
        submitted = completed = written = failed = 0
        while True:
            result = batch_step(settings, target)
            completed += result.completed_jobs
            submitted += result.submitted_inputs
            written, failed = written + result.written, failed + result.failed
            bar.update(completed, completed + result.open_jobs,
                       f"{written} rows written, {failed} failed")
            if not args.wait or result.back_to_queue:
                break
            if time.monotonic() > deadline:
                raise WaitTimeoutError("batch: --timeout reached with jobs still open"
                                       " (run again later)")
            time.sleep(args.poll)
    print(f"batch: {submitted} inputs submitted, {completed} jobs completed"
          f" ({written} rows written, {failed} failed), {result.open_jobs} open")
    if result.back_to_queue:
        print("batch: all jobs done; remaining rows go through the normal queue")
    return EXIT_OK
