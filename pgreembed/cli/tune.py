"""`pgreembed tune`: its options and its report."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from pgreembed.cli.formatting import add_command
from pgreembed.cli.output import emit
from pgreembed.config import load_settings
from pgreembed.errors import EXIT_OK, EXIT_REFUSED
from pgreembed.operations.defaults import (
    DEFAULT_EXACT_TIMEOUT_MS,
    DEFAULT_K,
    DEFAULT_QUERIES,
    DEFAULT_RECALL,
    MAX_QUERIES,
)

if TYPE_CHECKING:
    from pgreembed.operations.tune import TuneResult


def print_result(result: TuneResult) -> None:
    from pgreembed.operations.tune import settings_text

    index = result.index
    options = ", ".join(f"{k}={v}" for k, v in index.options.items())
    print(f"tune {result.target}.{result.column} ({result.role}, {result.model}):"
          f" {index.method} index {index.name} ({index.distance}{', ' if options else ''}"
          f"{options}); {result.current.queries} sample queries (stored vectors of random"
          f" rows{', filter: ' + result.filter_sql if result.filter_sql else ''}),"
          f" recall@{result.k} against exact search, target {result.target_recall}")
    width = max(len(settings_text(m.settings)) for m in [result.current, *result.rows]) + 12
    print(f"{'setting':<{width}} {'recall@' + str(result.k):>9} {'p50 ms':>8} {'p99 ms':>8}")
    rows = [(f"now: {settings_text(result.current.settings)}", result.current),
            *((settings_text(m.settings), m) for m in result.rows)]
    for label, m in rows:
        print(f"{label:<{width}} {m.recall:>9.3f} {m.p50_ms:>8.2f} {m.p99_ms:>8.2f}"
              f"{f'  ({m.short} queries came back short)' if m.short else ''}")
    for note in result.notes:
        print(f"note: {note}")
    if result.recommended is None:
        print(f"no setting reached recall {result.target_recall}; nothing recorded"
              " (a larger index build parameter, m / lists, or exact search is needed)")
        return
    print(f"recommended: {settings_text(result.recommended.settings)} (recall"
          f" {result.recommended.recall:.3f}); recorded for pgreembed.operations.search. In other"
          " sessions:")
    for statement in result.statements:
        print(f"  {statement}")


def cmd_tune(args: argparse.Namespace) -> int:
    from pgreembed.operations.tune import tune  # numpy: when run, not when parsing

    settings = load_settings(args.config)
    result = tune(settings, settings.target(args.target), column=args.column,
                  recall_target=args.recall, k=args.k, filter_sql=args.filter,
                  queries=args.queries, exact_timeout_ms=int(args.statement_timeout * 1000),
                  record=not args.dry_run)
    if args.json:
        emit("tune", result.as_dict())
    else:
        print_result(result)
    return EXIT_OK if result.recommended is not None else EXIT_REFUSED  # nothing recorded


def _recall(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"a recall is in (0, 1], got {value}")
    return value


def _bounded_int(maximum: int) -> Any:
    def parse(text: str) -> int:
        value = int(text)
        if not 0 < value <= maximum:
            raise argparse.ArgumentTypeError(f"must be in 1..{maximum}, got {value}")
        return value
    return parse


def add_k_option(parser: argparse.ArgumentParser) -> None:
    """--k, shared by tune and migrate compare."""
    parser.add_argument("--k", type=_bounded_int(1000), default=DEFAULT_K,
                        help=f"recall@k: the number of neighbours compared (default {DEFAULT_K})")


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add `pgreembed tune` to the CLI's subcommands."""
    help_text = ("measure an index's recall against exact search and recommend the smallest"
                 " setting (hnsw.ef_search, ivfflat.probes) that reaches a target")
    parser = add_command(subparsers, "tune", help_text, help_text,
                         example="pgreembed tune --target docs --recall 0.98 --dry-run")
    parser.set_defaults(handler=cmd_tune)
    parser.add_argument("--target", required=True)
    parser.add_argument("--column", choices=["live", "incoming"], default="live",
                        help="the live column, or during a migration the incoming one")
    parser.add_argument("--recall", type=_recall, default=DEFAULT_RECALL,
                        help=f"recall@k to reach (default {DEFAULT_RECALL})")
    parser.add_argument("--filter", metavar="SQL",
                        help="a WHERE condition the app's searches use (trusted SQL, run in"
                             " read-only transactions); sweeps iterative scans too")
    add_k_option(parser)
    parser.add_argument("--queries", type=_bounded_int(MAX_QUERIES), default=DEFAULT_QUERIES,
                        help="sample queries (stored vectors of random rows; each costs one"
                             f" sequential scan for the exact answer; at most {MAX_QUERIES})")
    parser.add_argument("--statement-timeout", type=float,
                        default=DEFAULT_EXACT_TIMEOUT_MS / 1000, metavar="SECONDS",
                        help="longest one exact (sequential-scan) query may run")
    parser.add_argument("--dry-run", action="store_true",
                        help="measure and recommend, record nothing")
    parser.add_argument("--json", action="store_true",
                        help="print only the versioned JSON document")
    return parser
