"""The chunk stage: dirty parents -> split -> matched -> applied in one short transaction.

It runs before each dispatch pass (scheduler and `tick`). Splitting happens outside any
transaction; applying re-checks each parent (pgreembed.store.chunk_sets), so a parent
edited meanwhile is left dirty and done again with its new text. The new chunks are rows
with a NULL vector in the chunk table, which the ordinary machinery then embeds like any
pending row of a target table (dedupe gives a text already embedded its vector for free).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from pgreembed.chunking.matching import match
from pgreembed.chunking.splitter import chunker
from pgreembed.config import Settings, Target
from pgreembed.config.chunking import Chunking
from pgreembed.errors import PgreembedError
from pgreembed.store.chunk_sets import Applied, apply_chunk_sets, read_dirty, sweep_gone
from pgreembed.store.chunks import parent_key
from pgreembed.store.rechunk_sets import ChunkSet, copy_known, same_settings, sets_of

log = logging.getLogger(__name__)

PARENTS_PER_TRANSACTION = 100
PARENTS_PER_PASS = 2000  # then the dispatch pass runs; the rest is done next pass


@dataclass
class StageReport:
    parents: int = 0
    stale: int = 0
    inserted: int = 0
    deleted: int = 0
    kept: int = 0
    removed: int = 0  # chunks of parents deleted under an older snapshot (sweep_gone)
    copied: int = 0  # vectors a re-chunk's new set took from the live set (same text)

    def add(self, applied: Applied) -> None:
        self.parents += applied.parents
        self.stale += applied.stale
        self.inserted += applied.inserted
        self.deleted += applied.deleted
        self.kept += applied.kept


@functools.lru_cache(maxsize=32)
def _chunker(chunking: Chunking, provider: str, model: str
             ) -> Callable[[str, Mapping[str, Any]], list[str]]:
    return chunker(chunking, provider, model)


def rechunk(conn: psycopg.Connection, target: Target,
            limit: int = PARENTS_PER_TRANSACTION) -> Applied:
    """One batch of `target`'s dirty parents; commits. Applied.parents == 0 and
    Applied.stale == 0: nothing was dirty. `target` names one chunk set (chunk_sets.sets_of):
    its table, dirty table and the settings the set was made with."""
    key = parent_key(conn, target)
    parents = read_dirty(conn, target, key, limit)
    conn.commit()
    if not parents:
        return Applied()
    chunking = target.parent.chunking
    chunks_of = _chunker(chunking, target.provider, target.model)
    planned = [(p, chunks_of(p.text or "", p.row)) for p in parents]
    try:
        # The set's table first: a re-chunk swap (which renames the sets) cannot commit
        # until this does, and the settings read under it are the ones this set has.
        if not same_settings(conn, target, chunking):
            conn.rollback()
            return Applied(stale=len(parents))  # swapped meanwhile: split again next
        applied = apply_chunk_sets(conn, target, key,
                                   sql.Identifier(target.vector_column), planned, match)
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    if applied.stale:
        log.info("target %s: %d parents changed while being chunked; done again next",
                 target.name, applied.stale)
    return applied


def run_chunk_stage(conn: psycopg.Connection, settings: Settings,
                    max_parents: int = PARENTS_PER_PASS) -> StageReport:
    """Re-chunk dirty parents of every chunked target (bounded per pass). A failure is
    logged and left for the next pass: the marks stay in Postgres."""
    report = StageReport()
    for configured in settings.targets.values():
        if configured.parent is None:
            continue
        try:
            sets = sets_of(conn, configured)
            conn.commit()
        except (psycopg.Error, PgreembedError) as exc:
            conn.rollback()
            log.warning("chunk stage of %s: %s: %s", configured.name, type(exc).__name__, exc)
            continue
        for chunk_set in sets:
            _run_set(conn, chunk_set, max_parents, report)
    return report


def _run_set(conn: psycopg.Connection, chunk_set: ChunkSet, max_parents: int,
             report: StageReport) -> None:
    target = chunk_set.target
    done = 0
    try:
        report.removed += sweep_gone(conn, target, parent_key(conn, target))
        conn.commit()
        while done < max_parents:
            applied = rechunk(conn, target)
            report.add(applied)
            done += applied.parents + applied.stale
            if applied.parents == 0:
                break  # nothing dirty, or all of it busy: next pass
        if chunk_set.copy_from is not None:
            report.copied += copy_known(conn, chunk_set)
    except (psycopg.Error, PgreembedError) as exc:
        conn.rollback()
        log.warning("chunk stage of %s: %s: %s", target.name, type(exc).__name__, exc)
    except Exception:  # noqa: BLE001 - a splitter's bug must not stop every target's pass
        conn.rollback()
        log.exception("chunk stage of %s failed; its parents stay dirty", target.name)
