"""`migrate plan --rechunk`: what a re-chunk would make, embed and cost; changes nothing.

The parents' texts are split with the configured `[target.chunking]` (all of them up to
`sample_parents`, else a random sample, scaled to the table). A new chunk whose text the
live set already holds with a vector of the model costs nothing (the stage copies it), so
only the distinct texts the live set lacks are counted, in tokens and at the model's list
price. Disk: the new set beside the live one until finalize.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from pgreembed.chunking.splitter import chunker
from pgreembed.config import Settings, Target
from pgreembed.config.chunking import Chunking
from pgreembed.embedding.pricing import list_price
from pgreembed.errors import MigrationError
from pgreembed.store import chunk_settings, rechunk_plan_sql
from pgreembed.store.chunks import dirty_table, parent_of
from pgreembed.store.pool import connect
from pgreembed.store.slots import load_slots

SAMPLE_PARENTS = 5000


@dataclass(frozen=True)
class RechunkPlan:
    parents: int
    parents_split: int  # parents whose text was split (all, or a sample)
    chunks_now: int
    chunks_after: int  # estimated when parents_split < parents
    distinct_after: int  # distinct chunk texts of the new set (estimated likewise)
    texts_to_embed: int  # distinct new texts the live set has no vector for
    chunks_reused: int  # new chunks whose text the live set holds embedded: copied
    tokens: int
    tokens_counted_by_tokenizer: bool
    cost_usd: float | None
    table_bytes: int  # the live chunk set now (heap, TOAST, indexes)
    new_set_bytes: int  # estimated size of the new set once filled and indexed
    split_seconds: float
    parents_without_chunks: int  # no text (estimated likewise): no chunk in either set
    column_type: str
    made_with: Chunking
    wanted: Chunking
    blockers: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def estimated(self) -> bool:
        return self.parents_split < self.parents


def plan(settings: Settings, target: Target, sample_parents: int = SAMPLE_PARENTS
         ) -> RechunkPlan:
    from pgreembed.embedding.providers import make_provider

    if target.parent is None:
        raise MigrationError(f"--rechunk: target {target.name!r} has no [target.chunking]")
    wanted = parent_of(target).chunking
    blockers: list[str] = []
    notes: list[str] = []
    with connect(settings.database_url) as conn:
        live = next((s for s in load_slots(conn, target) if s.role == "live"), None)
        if live is None:
            raise MigrationError(f"target {target.name!r} is not initialised: pgreembed init")
        made = chunk_settings.recorded(conn, dirty_table(target))
        counts = rechunk_plan_sql.counts(conn, target)
        rows = rechunk_plan_sql.parent_texts(conn, target, counts.parents, sample_parents)
        open_migration = conn.execute(
            "SELECT id, phase FROM pgreembed.migrations WHERE target = %s"
            " AND phase IN ('filling', 'swapped', 'rolled_back')", (target.name,)).fetchone()
        conn.rollback()
        split = chunker(wanted, live.provider, live.model)
        began = time.monotonic()
        per_parent = [split(text or "", row) for text, row in rows]
        chunks = [c for each in per_parent for c in each]
        split_seconds = time.monotonic() - began
        distinct = sorted(set(chunks))
        known = rechunk_plan_sql.embedded_texts(conn, live, distinct)
        conn.rollback()
    if made is None:
        blockers.append("the settings the chunk set was made with are not recorded: run"
                        " `pgreembed init` once with them")
    elif made == wanted:
        blockers.append("the chunk set is already made with the configured"
                        " [target.chunking]: nothing to re-chunk")
    if live.model_key != target.model_key:
        blockers.append(f"the config names {target.model_key}, the chunk table holds"
                        f" {live.model_key}: a re-chunk keeps the model; one change at a time")
    if open_migration is not None:
        blockers.append(f"migration {open_migration[0]} of {target.name!r} is open"
                        f" ({open_migration[1]}): finish or cancel it first")
    new_texts = [t for t in distinct if t not in known]
    scale = counts.parents / max(1, len(rows)) if len(rows) < counts.parents else 1.0
    embedder = make_provider(settings, live.provider, live.model, live.dimensions, target)
    counted = sum(embedder.count_tokens(new_texts)) if new_texts else 0
    tokens = math.ceil(counted * scale)
    price = list_price(live.provider, live.model, target)
    chunks_after = round(len(chunks) * scale)
    per_chunk = counts.table_bytes / max(1, counts.chunks)
    if len(rows) < counts.parents:
        notes.append(f"estimated from {len(rows)} of {counts.parents} parents (a random"
                     " sample): distinct and new texts shared across parents are"
                     " over-counted, so the cost is an upper bound")
    if chunks_after > counts.chunks:
        notes.append("the new set has more chunks: searches by parent (search_parents) see"
                     " finer chunks after the swap")
    return RechunkPlan(
        parents=counts.parents, parents_split=len(rows), chunks_now=counts.chunks,
        chunks_after=chunks_after, distinct_after=round(len(distinct) * scale),
        texts_to_embed=round(len(new_texts) * scale),
        chunks_reused=round(sum(1 for c in chunks if c in known) * scale), tokens=tokens,
        tokens_counted_by_tokenizer=embedder.counts_exactly,
        cost_usd=None if price is None else tokens / 1e6 * price,
        table_bytes=counts.table_bytes,
        new_set_bytes=round(per_chunk * chunks_after) if counts.chunks else 0,
        split_seconds=split_seconds,
        parents_without_chunks=round(sum(1 for each in per_parent if not each) * scale),
        column_type=live.column_type, made_with=made or wanted, wanted=wanted,
        blockers=blockers, notes=notes)
