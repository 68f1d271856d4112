"""`pgreembed import-pgai`: adopt pgai vectorizers without re-embedding (issue 26).

The plan with its chunk and vector checks is the default (a dry run); `--adopt` registers
the stored vectors (pgai stays in charge); `--take-over` adopts and then hands pgai's
trigger, queue and failures to pgreembed (cli/pgai_takeover.py); `--undo` hands back.
Works without a pgreembed config (DATABASE_URL and the provider's
variables from the environment); with one, its settings are used and the mapped targets
added to them for this run (the TOML printed is what to add to the file).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pgreembed.cli import pgai_takeover
from pgreembed.cli.formatting import add_command, non_negative_int
from pgreembed.cli.output import emit
from pgreembed.config import Settings, Target, environment, load_settings, parse_settings
from pgreembed.errors import EXIT_OK, ConfigError, ImportRefused
from pgreembed.operations.pgai_mapping import DEFAULT_VERIFY_CHUNKS, DEFAULT_VERIFY_VECTORS
from pgreembed.store.pool import connect
from pgreembed.store.table_lock import DEFAULT_WAIT_SECONDS, LockPolicy

if TYPE_CHECKING:
    from pgreembed.operations.pgai_import import VectorizerPlan


def _base(args: argparse.Namespace) -> tuple[str, Settings | None]:
    """(database URL, the config's settings if there is a config file)."""
    env = environment.process_environment()
    path = args.config or environment.CONFIG.get(env)
    if path or Path("pgreembed.toml").exists():
        settings = load_settings(path)
        return settings.database_url, settings
    dsn = environment.DATABASE_URL.get(env)
    if not dsn:
        raise ConfigError("DATABASE_URL: not set (environment variable, or a config file"
                          " with database_url)")
    return dsn, None


def _with_targets(base: Settings | None, plans: Sequence[VectorizerPlan]) -> Settings:
    targets: dict[str, Target] = {p.target.name: p.target for p in plans
                                  if p.target is not None}
    if base is not None:
        return dataclasses.replace(base, targets={**base.targets, **targets})
    return parse_settings({"target": [p.mapping.target for p in plans if p.target is not None]},
                          environment.process_environment())


def _print_plan(plan: VectorizerPlan) -> None:
    d = plan.as_dict()
    state = ("NOT adoptable" if not d["adoptable"] else
             "adoptable" if d["in_charge"] is None else f"adopted, {d['in_charge']} in charge")
    if d["adoptable"] and d["foreign"]:
        state += ", never embedded with"
    print(f"vectorizer {d['vectorizer']} (id {d['id']}): {d['source']} -> {d['maps_to']}"
          f" target {d['vectorizer']!r} ({state}{', frozen' if d['frozen'] else ''})")
    print(f"  rows {d['rows']:,}, chunks {d['chunks']:,}, queued {d['queued']:,},"
          f" failed {d['failed']:,}{', disabled in pgai' if d['disabled'] else ''}")
    for note in d["not_mapped"]:
        print(f"  {note['kind']}: {note['what']}: {note['reason']}")
    check = plan.chunk_check
    if check is not None:
        if check.skipped:
            print(f"  chunk check: skipped ({check.skipped})")
        elif check.sampled:
            print(f"  chunk check: {check.identical} of {check.sampled} parents identical"
                  f" ({100 * (check.share or 0):.1f}%), {check.chunks_matched} of"
                  f" {check.chunks_stored} stored chunks matched")
    vectors = plan.vector_check
    if vectors is not None:
        said = (f"skipped ({vectors.skipped})" if vectors.skipped else
                f"{vectors.sampled} re-embedded, lowest cosine {vectors.min_cosine}")
        print(f"  vector check: {said}")
    if plan.adopted_chunks is not None:
        print(f"  adopted: {plan.adopted_chunks:,} stored vectors recorded as"
              f" {plan.target.model_key if plan.target else '?'}; no chunk rewritten")
    print("  TOML:")
    print("".join(f"    {line}\n" for line in plan.mapping.toml().splitlines()), end="")


def cmd_import_pgai(args: argparse.Namespace) -> int:
    """Without --adopt, --take-over or --undo: the plan and its checks (a dry run)."""
    if args.vectorizer and args.all:
        raise ConfigError("--vectorizer and --all: give one")
    adopting = bool(args.adopt or args.take_over)
    if args.dry_run and (adopting or args.undo):
        raise ConfigError("--dry-run plans only: it cannot be given with --adopt,"
                          " --take-over or --undo")
    if (adopting or args.undo) and not (args.vectorizer or args.all):
        raise ConfigError("--adopt, --take-over and --undo need --vectorizer NAME or --all")
    dry_run = not adopting
    from pgreembed.operations import pgai_import  # numpy, the providers: only when run

    dsn, base = _base(args)
    with connect(dsn, vector=False) as conn:
        plans = pgai_import.make_plan(conn, args.vectorizer or None)
        if args.undo:
            return pgai_takeover.cmd_take_over(args, _with_targets(base, plans))
        for plan in plans:
            plan.chunk_check = pgai_import.verify_chunks(conn, plan, args.verify_chunks)
    vectors = (None if args.no_embed_check else
               args.verify_vectors if args.verify_vectors is not None else
               None if dry_run else DEFAULT_VERIFY_VECTORS)
    if not dry_run:
        if args.take_over:  # before any check spends or any change is made
            from pgreembed.operations.pgai_control import refuse_foreign
            for plan in plans:
                if plan.target is not None:
                    refuse_foreign(plan.vectorizer.name, plan.target)
        refused = [p for p in plans if p.target is None]
        if refused:  # all or nothing: before any check spends or any change is made
            raise ImportRefused("cannot adopt " + "; ".join(
                f"{p.vectorizer.name!r} ({p.mapping.refusal})" for p in refused)
                + "; nothing was changed (a run without --adopt or --take-over shows the"
                " plan; name the others with --vectorizer)")
    if (not dry_run or vectors) and any(p.target is not None for p in plans):
        settings = _with_targets(base, plans)
        with connect(dsn) as conn:
            for plan in plans:  # every check before the first change
                if vectors:
                    plan.vector_check = pgai_import.verify_vectors(conn, settings, plan, vectors)
        if not dry_run:
            policy = LockPolicy(wait_seconds=args.lock_wait)
            for plan in plans:
                # --take-over adopts what no earlier --adopt did (an adopted target is
                # taken over as it is: pgai's batch in flight may hold its chunk table).
                if not (args.take_over and pgai_import.is_adopted(settings, plan)):
                    pgai_import.adopt(settings, plan, policy)
        if args.take_over:
            return pgai_takeover.cmd_take_over(args, settings)
    with connect(dsn, vector=False) as conn:  # after this run's adoption, if any
        for plan in plans:
            plan.in_charge = pgai_import.in_charge(conn, plan)
        conn.rollback()
    if args.json:
        emit("import-pgai", {"dry_run": dry_run,
                             "vectorizers": [p.as_dict() for p in plans]})
    else:
        for plan in plans:
            _print_plan(plan)
        if dry_run:
            print("dry run: nothing changed (--adopt registers the stored vectors,"
                  " --take-over also hands pgai's work to pgreembed)")
    return EXIT_OK


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add `pgreembed import-pgai` to the CLI's subcommands."""
    help_text = ("adopt pgai vectorizers without re-embedding: plan and check (the default),"
                 " --adopt, --take-over from pgai's worker, --undo")
    parser = add_command(subparsers, "import-pgai", help_text, help_text,
                         example="pgreembed import-pgai --vectorizer blog_embedding --dry-run")
    parser.set_defaults(handler=cmd_import_pgai)
    parser.add_argument("--vectorizer", action="append", metavar="NAME", default=[],
                        help="a pgai vectorizer by name (repeat for several)")
    parser.add_argument("--all", action="store_true", help="every vectorizer in ai.vectorizer")
    parser.add_argument("--dry-run", action="store_true",
                        help="plan and check only, change nothing (the default without"
                             " --adopt, --take-over or --undo)")
    parser.add_argument("--verify-chunks", type=non_negative_int, metavar="N",
                        default=DEFAULT_VERIFY_CHUNKS,
                        help="re-split N stored parents and compare (default"
                             f" {DEFAULT_VERIFY_CHUNKS}; free)")
    checks = parser.add_mutually_exclusive_group()
    checks.add_argument("--verify-vectors", type=non_negative_int, metavar="K",
                        help="re-embed K stored chunks, require cosine >= 0.999 (default"
                             f" {DEFAULT_VERIFY_VECTORS} when adopting; costs K"
                             " inputs)")
    checks.add_argument("--no-embed-check", action="store_true",
                        help="skip the vector check: 0 texts sent to any provider")
    parser.add_argument("--lock-wait", type=float, default=DEFAULT_WAIT_SECONDS, metavar="S",
                        help="give up after retrying a table's lock this long")
    parser.add_argument("--json", action="store_true",
                        help="print only the versioned JSON document")
    pgai_takeover.add_arguments(parser)
    return parser
