"""`pgreembed doctor`: its options, its output (text or JSON) and its exit code."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pgreembed.cli.formatting import add_command, positive_int
from pgreembed.cli.output import emit
from pgreembed.operations.defaults import DEFAULT_TOLERANCE


def cmd_doctor(args: argparse.Namespace) -> int:
    # Here, not at the top: every `pgreembed` call builds the parser, doctor's too.
    from pgreembed.config import load_settings
    from pgreembed.operations.doctor.checks import run_doctor
    from pgreembed.operations.doctor.findings import ERROR, WARN, exit_code

    settings = load_settings(args.config)
    # With --json, stdout is the JSON document alone: the spend notice goes to stderr.
    notices = sys.stderr if args.json else sys.stdout
    findings = run_doctor(settings, targets=args.target or None, sample_rows=args.sample,
                          worker_processes=args.worker_processes,
                          statement_timeout=args.statement_timeout,
                          verify_rows=args.verify, tolerance=args.tolerance,
                          recall_queries=args.recall_queries if args.recall else 0,
                          recall_k=args.k, recall_target=args.recall_target,
                          announce=lambda line: print(line, file=notices, flush=True))
    if args.json:
        emit("doctor", {"findings": [f.as_dict() for f in findings]})
    else:
        for f in findings:
            print(f"{f.level.upper():<5}  {f.target or '(server)'}: {f.message}")
        errors = sum(f.level == ERROR for f in findings)
        warnings = sum(f.level == WARN for f in findings)
        print(f"doctor: {errors} error(s), {warnings} warning(s)")
    return exit_code(findings)


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _recall(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"a recall is in (0, 1], got {value}")
    return value


def _similarity(text: str) -> float:
    value = float(text)
    if not -1.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"a cosine similarity is in [-1, 1], got {value}")
    return value


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add `pgreembed doctor` to the CLI's subcommands."""
    help_text = "read-only health checks of the targets (exit 1 if any error)"
    parser = add_command(subparsers, "doctor", help_text, help_text,
                         example="pgreembed doctor --target docs --recall --json")
    parser.set_defaults(handler=cmd_doctor)
    parser.add_argument("--json", action="store_true",
                        help="print only the versioned JSON document")
    parser.add_argument("--target", action="append", help="only this target (repeatable)")
    parser.add_argument("--sample", type=int, default=1000, metavar="ROWS",
                        help="vectors sampled for the zero/norm checks")
    parser.add_argument("--worker-processes", type=int, default=2, metavar="N",
                        help="Dramatiq worker processes across all machines"
                             " (replicas x --processes), for the connection check")
    parser.add_argument("--statement-timeout", type=float, default=60.0, metavar="SECONDS",
                        help="longest any single check may run")
    parser.add_argument("--verify", type=_non_negative_int, default=0, metavar="N",
                        help="re-embed N random rows per vector column with its recorded"
                             " model and report rows whose stored vector disagrees (spends"
                             " tokens; the count is printed first)")
    parser.add_argument("--tolerance", type=_similarity, default=DEFAULT_TOLERANCE,
                        metavar="T", help="--verify: lowest cosine similarity that agrees"
                                          f" (default {DEFAULT_TOLERANCE})")
    parser.add_argument("--recall", action="store_true",
                        help="measure each ANN index's recall@k against exact search at the"
                             " settings the search helper (pgreembed.operations.search)"
                             " applies; warn below the target (no tokens: sample queries"
                             " are stored vectors)")
    parser.add_argument("--recall-queries", type=positive_int, default=50, metavar="N",
                        help="--recall: sample queries per index (each costs one sequential"
                             " scan for the exact answer; default 50, at most 1000)")
    parser.add_argument("--recall-target", type=_recall, metavar="R",
                        help="--recall: lowest acceptable recall (default: the target `tune`"
                             " was given, else 0.95)")
    parser.add_argument("--k", type=positive_int, default=10,
                        help="--recall: recall@k (default 10)")
    return parser
