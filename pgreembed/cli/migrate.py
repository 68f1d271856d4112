"""`pgreembed migrate <step>`: one subcommand per runbook step, each with only its own options.

An option another step takes is a usage error here (exit 2), never silently ignored.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pgreembed.cli.formatting import add_command, non_negative_int, positive_int
from pgreembed.config import PROVIDERS
from pgreembed.config.distances import DISTANCE_ALIASES, DISTANCES
from pgreembed.store.table_lock import DEFAULT_LOCK_TIMEOUT_MS, DEFAULT_WAIT_SECONDS

# migrations.swap's (and rechunk's) default, here so that building the parser (every
# `pgreembed` call) imports no migration code; tests/test_cli_usage checks they agree.
DEFAULT_MAX_UNSEARCHABLE = 100


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


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--provider", choices=list(PROVIDERS),
                   help="the new model's provider (default: the target's configured one)")
    p.add_argument("--model", help="the new model (required unless --derive)")
    p.add_argument("--dimensions", type=positive_int,
                   help="the new model's vector size (required unless --derive)")
    p.add_argument("--derive", metavar="dimensions:D|halfvec",
                   help="no provider call: the new column is made in SQL from the live"
                        " vectors, shortened to D dims (text-embedding-3-* and other"
                        " shortenable models) or cast to halfvec (same model, half the bytes)")
    p.add_argument("--requests-per-minute", type=positive_int, metavar="N",
                   help="the new model's request budget, shared by every worker (start"
                        " records it; plan estimates with it)")
    p.add_argument("--tokens-per-minute", type=positive_int, metavar="N",
                   help="the new model's token budget, shared by every worker (start"
                        " records it; plan estimates with it)")


def _lock_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lock-timeout-ms", type=positive_int, default=DEFAULT_LOCK_TIMEOUT_MS,
                   help="longest wait of one lock attempt (the app's queries queue behind it"
                        f" meanwhile; default {DEFAULT_LOCK_TIMEOUT_MS})")
    p.add_argument("--lock-wait", type=float, default=DEFAULT_WAIT_SECONDS, metavar="S",
                   help="give up after retrying the lock this long (exit 4)")
    p.add_argument("--terminate-idle-after", type=float, metavar="S",
                   help="after waiting S seconds for the lock, end sessions idle in a"
                        " transaction on the table for S seconds or more (off by default)")


def _json_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true",
                   help="print only the versioned JSON document (no progress)")


def _rechunk_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rechunk", action="store_true",
                   help="a chunked target: a new chunk set with the configured"
                        " [target.chunking], side by side (the model stays)")


def _plan(p: argparse.ArgumentParser) -> None:
    _model_options(p)
    _rechunk_option(p)
    p.add_argument("--disk-budget", metavar="SIZE",
                   help="refuse (exit 4) if the table would grow by more than this at the"
                        " migration's peak: bytes, or e.g. 500MB, 20GB, 1.5TiB")
    _json_option(p)


def _start(p: argparse.ArgumentParser) -> None:
    _model_options(p)
    _rechunk_option(p)
    p.add_argument("--spend-cap", type=_spend_cap, metavar="USD",
                   help="pause the migration once it has cost this much")
    p.add_argument("--batch-api", action="store_true",
                   help="fill through the OpenAI Batch API (half price, <= 24 h)")
    _lock_options(p)


def _resume(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spend-cap", type=_spend_cap, metavar="USD",
                   help="raise the cap (or `none`: no cap); default: keep it")


def _index(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", choices=["hnsw", "ivfflat"],
                   help="default the live column's index method, else hnsw")
    p.add_argument("--distance", choices=[*DISTANCES, *DISTANCE_ALIASES],
                   help="default the live column's index distance, else the target's"
                        " `distance`")
    p.add_argument("--lists", type=positive_int, help="ivfflat lists (default from row count)")
    p.add_argument("--m", type=positive_int, default=16, help="hnsw m (default 16)")
    p.add_argument("--ef-construction", type=positive_int, default=64,
                   help="hnsw ef_construction (default 64)")
    p.add_argument("--maintenance-work-mem", default="512MB", metavar="SIZE",
                   help="maintenance_work_mem of the build (default 512MB)")
    p.add_argument("--parallel-workers", type=non_negative_int, metavar="N",
                   help="parallel workers of the build (max_parallel_maintenance_workers;"
                        " default the server's, 2 unless changed)")


def _swap(p: argparse.ArgumentParser) -> None:
    p.add_argument("--timeout", type=float, default=300.0, metavar="S",
                   help="seconds to wait for rows to catch up (then exit 3)")
    p.add_argument("--max-unsearchable", type=int, default=DEFAULT_MAX_UNSEARCHABLE,
                   metavar="ROWS",
                   help="go ahead when at most this many rows searchable now have no vector"
                        " in the incoming column yet (embedded for the new live model"
                        " seconds later)")
    p.add_argument("--accept-failed", action="store_true",
                   help="go ahead although some rows failed to embed in the incoming column"
                        " (they drop out of search)")
    _lock_options(p)
    _json_option(p)


def _compare(p: argparse.ArgumentParser) -> None:
    from pgreembed.cli.tune import add_k_option

    p.add_argument("--queries", metavar="FILE",
                   help="query texts, one per line (default: --sample)")
    p.add_argument("--sample", type=positive_int, metavar="N",
                   help="N rows' texts as self-retrieval queries (default 100)")
    add_k_option(p)
    _json_option(p)


def _compact(p: argparse.ArgumentParser) -> None:
    _lock_options(p)
    _json_option(p)


def _batch(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait", action="store_true", help="poll until the jobs are done")
    p.add_argument("--poll", type=float, default=30.0, metavar="S",
                   help="--wait: seconds between polls (default 30)")
    p.add_argument("--timeout", type=float, default=300.0, metavar="S",
                   help="--wait: give up after this long (exit 3; run again later)")


Step = tuple[str, Callable[[Any], None] | None, str]  # help, options, example
T = "--target docs"
STEPS: dict[str, Step] = {
    "plan": ("rows, tokens, cost, time, storage and the SQL; changes nothing (exit 4 if"
             " blocked)", _plan,
             f"pgreembed migrate plan {T} --model text-embedding-3-large --dimensions 1536"),
    "start": ("add the new column and let the scheduler and workers fill it", _start,
              f"pgreembed migrate start {T} --model text-embedding-3-large --dimensions"
              " 1536 --spend-cap 50"),
    "status": ("progress, rate, ETA, spend and the new column's indexes", _json_option,
               f"pgreembed migrate status {T} --json"),
    "pause": ("stop sending the new column's rows (takes effect within a poll)",
              None, f"pgreembed migrate pause {T}"),
    "resume": ("send them again (a cap-paused migration needs a higher --spend-cap)",
               _resume, f"pgreembed migrate resume {T} --spend-cap 80"),
    "cancel": ("drop the new column; the table is left as it was", _lock_options,
               f"pgreembed migrate cancel {T}"),
    "index": ("CREATE INDEX CONCURRENTLY on the new column, with a progress bar",
              _index, f"pgreembed migrate index {T} --method hnsw --m 16"),
    "compare": ("the quality gate: retrieval of the new model and its index's recall",
                _compare, f"pgreembed migrate compare {T} --sample 200"),
    "swap": ("wait for the new column to catch up, then swap it live in one short"
             " transaction", _swap, f"pgreembed migrate swap {T} --timeout 600"),
    "rollback": ("the same swap backwards (instant)", _swap, f"pgreembed migrate rollback {T}"),
    "finalize": ("drop the previous column once the swap is trusted", _lock_options,
                 f"pgreembed migrate finalize {T}"),
    "compact": ("after finalize: move the live vectors out of the TOAST file's tail so"
                " VACUUM gives the freed space back to the OS (costs about an in-place"
                " write of each moved row; opt-in)", _compact,
                f"pgreembed migrate compact {T} --json"),
    "batch": ("submit / poll the OpenAI Batch API jobs of a --batch-api migration",
              _batch, f"pgreembed migrate batch {T} --wait --poll 60"),
}


def run_step(args: argparse.Namespace) -> int:
    """Run `migrate <step>`: its handler is imported here, when a step runs, so that
    building the parser imports none of the migration machinery."""
    from pgreembed.cli import migrate_compact
    from pgreembed.cli import migrate_steps as steps

    handlers: dict[str, Callable[[argparse.Namespace], int]] = {
        "plan": steps.cmd_plan, "start": steps.cmd_start, "status": steps.cmd_status,
        "pause": steps.cmd_pause, "resume": steps.cmd_resume, "cancel": steps.cmd_cancel,
        "index": steps.cmd_index, "compare": steps.cmd_compare, "swap": steps.cmd_swap,
        "rollback": steps.cmd_swap, "finalize": steps.cmd_finalize,
        "compact": migrate_compact.cmd_compact, "batch": steps.cmd_batch}
    return handlers[args.step](args)


def _lifecycle_doc() -> str:
    from pgreembed.migrations import lifecycle

    return lifecycle.__doc__ or ""


def register(sub: Any) -> None:
    """Add `migrate` and its steps (each its own subcommand) to the main parser."""
    parser = add_command(sub, "migrate", "move a target to a new embedding model",
                         _lifecycle_doc,
                         example="pgreembed migrate plan --target docs --model M"
                                 " --dimensions 1536")
    sub_steps = parser.add_subparsers(dest="step", required=True, metavar="STEP")
    for name, (help_text, add_options, example) in STEPS.items():
        p = add_command(sub_steps, name, help_text, help_text, example=example)
        p.set_defaults(handler=run_step)
        p.add_argument("--target", required=True, help="the target (from the config)")
        if add_options is not None:
            add_options(p)
