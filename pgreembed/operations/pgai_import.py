"""`pgreembed import-pgai`: plan, verify and adopt pgai 0.12.1 vectorizers (issue 26).

- plan: per vectorizer, the target it maps to (operations.pgai_mapping), the TOML it
  implies, rows, chunks, queued and failed counts; a catalog older than pgai 0.10 is
  refused with the upgrade step, before anything is read or changed;
- verify: re-split N stored parents with the mapped settings and compare with the stored
  chunks (a match share; mismatching parents keep working: unchanged texts keep their
  vectors when re-chunked); re-embed K stored chunks and require cosine >= 0.999, else
  stop with "model differs" (nothing changed);
- adopt: the existing chunk table (or vector column) becomes the target's live column
  and every stored chunk gets a state row "embedded by the mapped model" (store.setup's
  adoption: one INSERT ... SELECT into pgreembed's state table). No chunk row is
  rewritten, no parent is marked for re-chunking, no text is sent with --no-embed-check.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psycopg
from psycopg import sql

from pgreembed.config import Settings, Target
from pgreembed.config.chunking import CHUNK_KEY, CHUNK_TEXT
from pgreembed.config.target import parse_target
from pgreembed.embedding.embed import embed_rows
from pgreembed.embedding.providers import make_provider
from pgreembed.errors import ConfigError, ImportRefused
from pgreembed.operations.pgai_mapping import Mapping, Note, map_vectorizer
from pgreembed.store import pgai_catalog, pgai_rights, takeover
from pgreembed.store.pgai_values import UPGRADE_STEP, Counts, Vectorizer
from pgreembed.store.pool import connect
from pgreembed.store.setup import init_target
from pgreembed.store.slots import load_slots
from pgreembed.store.table_lock import LockPolicy
from pgreembed.values import Row

MIN_COSINE = 0.999


@dataclass
class ChunkCheck:
    sampled: int = 0  # parents re-split
    identical: int = 0  # parents whose chunk list is byte-identical
    chunks_stored: int = 0
    chunks_matched: int = 0  # stored chunks found again at the same position
    skipped: str | None = None  # why no check ran (frozen, ordinary target)
    examples: list[Any] = field(default_factory=list)  # keys of mismatching parents

    @property
    def share(self) -> float | None:
        return None if not self.sampled else self.identical / self.sampled

    def as_dict(self) -> dict[str, Any]:
        return {"sampled": self.sampled, "identical": self.identical,
                "match_share": self.share, "chunks_stored": self.chunks_stored,
                "chunks_matched": self.chunks_matched, "skipped": self.skipped,
                "mismatching_keys": [str(k) for k in self.examples]}


@dataclass
class VectorCheck:
    sampled: int = 0
    min_cosine: float | None = None
    below: int = 0  # samples under MIN_COSINE
    skipped: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"sampled": self.sampled, "min_cosine": self.min_cosine, "below": self.below,
                "threshold": MIN_COSINE, "skipped": self.skipped}


@dataclass
class VectorizerPlan:
    vectorizer: Vectorizer
    mapping: Mapping
    counts: Counts
    target: Target | None  # None: the mapped TOML does not load (see the notes)
    chunk_check: ChunkCheck | None = None
    vector_check: VectorCheck | None = None
    adopted_chunks: int | None = None  # state rows written by the adoption
    # Who keeps it current once adopted: None (not adopted), PGAI or PGREEMBED (`in_charge`).
    in_charge: str | None = None

    def as_dict(self) -> dict[str, Any]:
        v, m = self.vectorizer, self.mapping
        return {
            "vectorizer": v.name, "id": v.id, "source": f"{v.source_schema}.{v.source_table}",
            "destination": v.destination_kind,
            "chunk_table": None if v.chunk_table is None else ".".join(v.chunk_table),
            "maps_to": m.kind, "target": m.target, "toml": m.toml(),
            "adoptable": m.adoptable, "frozen": m.frozen, "foreign": m.foreign,
            "rows": self.counts.rows, "chunks": self.counts.chunks,
            "queued": self.counts.queued, "failed": self.counts.failed,
            "disabled": v.disabled,
            "not_mapped": [n.as_dict() for n in m.notes],
            "chunk_check": None if self.chunk_check is None else self.chunk_check.as_dict(),
            "vector_check": None if self.vector_check is None else self.vector_check.as_dict(),
            "adopted_chunks": self.adopted_chunks,
            "in_charge": self.in_charge,
        }


def read_catalog(conn: psycopg.Connection, names: Sequence[str] | None) -> list[Vectorizer]:
    """The vectorizers asked for; refuses a missing or pre-0.10 catalog and unknown names."""
    grants = pgai_rights.catalog_grants(conn)
    if grants:
        raise ImportRefused(pgai_rights.lacking_message(grants, "import-pgai"))
    version = pgai_catalog.catalog_version(conn)
    if not version.installed:
        raise ImportRefused("no pgai catalog in this database (no table ai.vectorizer)")
    if not version.supported:
        found = version.lib_version or version.extension_version or "before 0.10"
        raise ImportRefused(f"the pgai catalog is {found} (older than 0.10): {UPGRADE_STEP};"
                            " nothing was changed")
    found_vectorizers = pgai_catalog.vectorizers(conn, names)
    missing = sorted(set(names or ()) - {v.name for v in found_vectorizers})
    if missing:
        raise ConfigError(f"no pgai vectorizer named {', '.join(missing)}")
    return found_vectorizers


def _target(mapping: Mapping) -> Target | None:
    if not mapping.adoptable:
        return None
    try:
        return parse_target(mapping.target, {})
    except ConfigError as exc:
        mapping.notes.append(Note("refused", "config", str(exc)))
        return None


def make_plan(conn: psycopg.Connection, names: Sequence[str] | None) -> list[VectorizerPlan]:
    plans = []
    found = read_catalog(conn, names)
    grants = [g for v in found for g in pgai_rights.vectorizer_grants(conn, v)]
    if grants:  # every step needs them, the plan's counts included (the queue's SELECT)
        raise ImportRefused(pgai_rights.lacking_message(grants, "import-pgai"))
    for v in found:
        mapping = map_vectorizer(v)
        plans.append(VectorizerPlan(v, mapping, pgai_catalog.counts(conn, v), _target(mapping)))
    conn.rollback()
    return plans


def verify_chunks(conn: psycopg.Connection, plan: VectorizerPlan, size: int) -> ChunkCheck:
    """Re-split `size` random chunked parents with the mapped settings; compare."""
    from pgreembed.chunking.splitter import chunker

    check = ChunkCheck()
    target = plan.target
    if target is None or target.parent is None:
        check.skipped = "not a chunk table" if target is not None else "not adoptable"
        return check
    if plan.mapping.frozen:
        check.skipped = "frozen: the source is not text pgreembed can re-split"
        return check
    chunks_of = chunker(target.parent.chunking, target.provider, target.model)
    for parent in pgai_catalog.sample_parents(conn, plan.vectorizer, plan.mapping.text_column,
                                              size):
        made = chunks_of(parent.text or "", parent.row) if parent.text else []
        check.sampled += 1
        check.chunks_stored += len(parent.chunks)
        check.chunks_matched += sum(a == b for a, b in zip(made, parent.chunks, strict=False))
        if made == parent.chunks:
            check.identical += 1
        elif len(check.examples) < 10:
            check.examples.append(parent.key)
    conn.rollback()
    return check


def verify_vectors(conn: psycopg.Connection, settings: Settings, plan: VectorizerPlan,
                   size: int) -> VectorCheck:
    """Re-embed `size` stored chunks with the mapped model; ImportRefused if one differs."""
    check = VectorCheck()
    target, v = plan.target, plan.vectorizer
    if target is None:
        check.skipped = "not adoptable"
        return check
    if plan.mapping.foreign:
        check.skipped = f"no {target.provider} provider in pgreembed: nothing sent"
        return check
    if v.chunk_table is not None:
        samples = pgai_catalog.sample_chunks(conn, v.chunk_table, CHUNK_KEY,
                                             sql.Identifier(CHUNK_TEXT), "embedding", size)
    else:
        samples = pgai_catalog.sample_chunks(
            conn, (v.source_schema, v.source_table), v.source_pk[0].name,
            sql.Identifier(plan.mapping.text_column), target.vector_column, size)
    conn.rollback()
    if not samples:
        check.skipped = "no stored vectors"
        return check
    provider = make_provider(settings, target.provider, target.model, target.dimensions,
                             target)
    outcome = embed_rows([Row(i, s.text, None) for i, s in enumerate(samples)], provider,
                         truncate=False)
    cosines = []
    for done in outcome.embedded:
        stored = np.asarray(samples[done.row.pk].vector, dtype=np.float32)
        made = np.asarray(done.vector, dtype=np.float32)
        norms = float(np.linalg.norm(stored)) * float(np.linalg.norm(made))
        cosines.append(float(np.dot(stored, made) / norms) if norms else 0.0)
    check.sampled = len(cosines)
    check.min_cosine = round(min(cosines), 6) if cosines else None
    check.below = sum(c < MIN_COSINE for c in cosines) + len(outcome.failed)
    if check.below:
        raise ImportRefused(
            f"vectorizer {v.name!r}: model differs: {check.below} of {len(samples)} stored"
            f" vectors are not what {target.model_key} makes of their text (lowest cosine"
            f" {check.min_cosine}, need >= {MIN_COSINE}); nothing was adopted. Check the"
            " provider's base URL and model, or migrate the vectorizer to a model pgreembed"
            " embeds")
    return check


# Who keeps an adopted vectorizer's vectors current (the plan's `in_charge`).
PGAI, PGREEMBED = "pgai", "pgreembed"


def in_charge(conn: psycopg.Connection, plan: VectorizerPlan) -> str | None:
    """Who keeps the plan's vectorizer current once adopted: PGAI (its worker: `--adopt`
    while it was enabled, or `--undo` after a take-over), PGREEMBED (taken over, or
    adopted while pgai's vectorizer was disabled); None when never adopted."""
    if plan.target is None:
        return None
    registry = conn.execute("SELECT to_regclass('pgreembed.slots')").fetchone()
    if not (registry and registry[0]) or not any(
            s.role == "live" for s in load_slots(conn, plan.target)):
        return None
    return PGAI if takeover.pgai_keeps_current(conn, plan.target) else PGREEMBED


def is_adopted(settings: Settings, plan: VectorizerPlan) -> bool:
    """Whether the plan's target already has its live column (an earlier adoption)."""
    with connect(settings.database_url, vector=False) as conn:
        found = in_charge(conn, plan) is not None
        conn.rollback()
    return found


def adopt(settings: Settings, plan: VectorizerPlan, policy: LockPolicy | None) -> int:
    """Register the stored chunks (or column) as the target's live column; returns the
    state rows recorded for the mapped model."""
    target = plan.target
    if target is None:
        raise ImportRefused(f"vectorizer {plan.vectorizer.name!r} cannot be adopted:"
                            f" {plan.mapping.refusal}")
    slot = init_target(settings.database_url, target, policy, adopt=target.parent is not None)
    with connect(settings.database_url, vector=False) as conn:
        live = next(s for s in load_slots(conn, target) if s.role == "live")
        adopted = pgai_catalog.state_rows(conn, live.state_table, slot.model_id)
        taken = takeover.read_takeover(conn, target)
        if target.parent is None and not plan.vectorizer.disabled and (
                taken is None or taken.state != "taken"):
            # pgai's worker writes this column until --take-over: the scheduler sends
            # nothing of it meanwhile (both would buy every edited text)
            takeover.pause_live(conn, live, True)
        conn.commit()
    plan.adopted_chunks = adopted
    return adopted
