"""`migrate plan|start --rechunk` and the steps of an open re-chunk migration (swap,
rollback, finalize, cancel): a new chunk set with the configured [target.chunking]."""

from __future__ import annotations

import argparse
import dataclasses

from pgreembed.cli.formatting import human_bytes
from pgreembed.cli.output import emit
from pgreembed.cli.progress import Progress
from pgreembed.config import Settings, Target
from pgreembed.errors import EXIT_OK, EXIT_REFUSED, ConfigError
from pgreembed.migrations import rechunk, rechunk_plan
from pgreembed.store.table_lock import LockPolicy


def _settings(chunking: object) -> str:
    fields = dataclasses.asdict(chunking)  # type: ignore[call-overload]
    return (f"{fields['splitter']} {fields['unit']} {fields['size']}/{fields['overlap']}"
            f" template {fields['template']!r}")


def plan_step(settings: Settings, target: Target, args: argparse.Namespace) -> int:
    if args.model or args.dimensions or args.derive:
        raise ConfigError("migrate plan --rechunk: the model stays; the settings come from"
                          " [target.chunking] (no --model, --dimensions, --derive)")
    p = rechunk_plan.plan(settings, target)
    code = EXIT_REFUSED if p.blockers else EXIT_OK
    if args.json:
        emit("migrate-plan", {
            "rows": p.parents, "rows_without_text": p.parents_without_chunks,
            "tokens": p.tokens, "tokens_exact": not p.estimated,
            "tokens_counted_by_tokenizer": p.tokens_counted_by_tokenizer,
            "cost_usd": p.cost_usd, "minutes_at_rate_limit": None,
            "requests_per_minute": None, "tokens_per_minute": None,
            "storage_bytes": p.new_set_bytes, "column": target.vector_column,
            "column_type": p.column_type, "statements": [], "blockers": p.blockers,
            "notes": p.notes, "app_objects": [], "rechunk": {
                "parents": p.parents, "parents_split": p.parents_split,
                "estimated": p.estimated, "chunks_now": p.chunks_now,
                "chunks_after": p.chunks_after, "distinct_texts_after": p.distinct_after,
                "texts_to_embed": p.texts_to_embed, "chunks_reused": p.chunks_reused,
                "tokens": p.tokens, "cost_usd": p.cost_usd,
                "table_bytes": p.table_bytes, "new_set_bytes": p.new_set_bytes,
                "peak_bytes": p.table_bytes + p.new_set_bytes,
                "split_seconds": round(p.split_seconds, 3),
                "from": dataclasses.asdict(p.made_with), "to": dataclasses.asdict(p.wanted)}})
        return code
    about = "~" if p.estimated else ""
    cost = "n/a (unknown price)" if p.cost_usd is None else f"${p.cost_usd:,.4f}"
    print(f"re-chunk of {target.name}: {_settings(p.made_with)} -> {_settings(p.wanted)}")
    print(f"parents: {p.parents} ({p.parents_split} split in {p.split_seconds:.2f} s)")
    print(f"chunks: {p.chunks_now} now, {about}{p.chunks_after} after"
          f" ({about}{p.distinct_after} distinct texts)")
    print(f"to embed: {about}{p.texts_to_embed} texts the live set has no vector for"
          f" ({about}{p.chunks_reused} chunks take a vector the live set has);"
          f" {about}{p.tokens:,} tokens, estimated cost {cost}")
    print(f"disk: the chunk set is {human_bytes(p.table_bytes)} now; the new one"
          f" ~{human_bytes(p.new_set_bytes)} beside it until finalize (peak"
          f" ~{human_bytes(p.table_bytes + p.new_set_bytes)})")
    for note in p.notes:
        print(f"note: {note}")
    for blocker in p.blockers:
        print(f"BLOCKER: {blocker}")
    return code


def start_step(settings: Settings, target: Target, args: argparse.Namespace,
               policy: LockPolicy) -> int:
    if args.model or args.dimensions or args.derive or args.batch_api or args.spend_cap:
        raise ConfigError("migrate start --rechunk: the model stays; the settings come from"
                          " [target.chunking] (no --model, --dimensions, --derive,"
                          " --batch-api, --spend-cap)")
    slot = rechunk.start(settings, target, policy)
    print(f"re-chunk started: the new chunk set {slot.target.schema}.{slot.target.table} is"
          " being filled by the chunk stage (texts the live set has take its vectors) and"
          " the workers; then `migrate index`, `migrate swap`")
    return EXIT_OK


def swap_step(settings: Settings, target: Target, args: argparse.Namespace,
              policy: LockPolicy) -> int:
    step = args.step
    with Progress(f"{step}: catching up", "items", as_json=args.json) as bar:
        first: list[int] = []

        def show(wait: rechunk.SwapWait) -> None:
            left = wait.parents + wait.chunks
            first.append(left)
            bar.update(max(first[0] - left, 0), first[0] - wait.allowed,
                       f"{wait.parents} parents to chunk, {wait.chunks} chunks to embed")

        result = rechunk.swap(settings, target, rollback=step == "rollback",
                              catch_up_timeout=args.timeout,
                              max_unsearchable=args.max_unsearchable, policy=policy,
                              on_wait=show)
    if args.json:
        emit(f"migrate-{step}", {
            "step": step, "attempts": result.attempts,
            "pause_ms": round(result.pause_seconds * 1000, 1),
            "seconds": round(result.waited_seconds, 3),
            "unsearchable": result.parents_left + result.chunks_left,
            "already_done": result.already_done, "app_objects": [], "comparison": None,
            "rechunk": {"parents_left": result.parents_left,
                        "chunks_left": result.chunks_left, "views": list(result.views)}})
    elif result.already_done:
        print(f"{step} was already done (committed by an earlier run): nothing to do")
    else:
        print(f"{step} done in {result.pause_seconds * 1000:.0f} ms of table lock (attempt"
              f" {result.attempts}, {result.waited_seconds:.1f} s in all): the chunk sets"
              f" exchanged names; {result.parents_left} parents to chunk and"
              f" {result.chunks_left} chunks to embed in the new live set")
        for view in result.views:
            print(f"view re-created over the live set: {view}")
    return EXIT_OK


def end_step(settings: Settings, target: Target, step: str, policy: LockPolicy) -> int:
    """finalize: drop the set that is not live; cancel: drop the new one (before a swap)."""
    end = rechunk.finalize if step == "finalize" else rechunk.cancel
    if end(settings, target, policy).already_done:
        print(f"{step} was already done (committed by an earlier run): nothing to do")
    else:
        print(f"re-chunk of {target.name} {'finalized' if step == 'finalize' else 'cancelled'}:"
              f" the {'previous' if step == 'finalize' else 'new'} chunk set is dropped")
    return EXIT_OK
