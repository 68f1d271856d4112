"""`doctor --verify N`: re-embed a random sample and compare it with what is stored.

The other doctor checks see only the shape of the vectors (size, norm, which model
the bookkeeping says); none of them notices a vector that belongs to another text
or another model (a bad manual backfill, a swap done by hand, a restore that mixed
columns). This one does, at the price of embedding N rows per column: it samples
rows whose vector is recorded as this column's model *and* whose text still hashes
to what was embedded (a row edited since is pending, not corrupt), embeds their
text with that model, and reports every row whose cosine similarity to the stored
vector is below the tolerance.

Default tolerance 0.99. What a correct vector can differ by: float16 storage of a
`halfvec` column (cosine ~1 - 1e-6), the local int8 model on another CPU or thread
count (>= 0.999, its measured agreement with the torch reference), and remote APIs,
which are slightly non-deterministic (repeated OpenAI calls are reported to agree to
~0.9999, rarely lower). What a wrong vector scores: another model's vector is
unrelated (~0), another text's vector from the same model typically 0.3-0.95 even for
related texts. 0.99 sits between the two with a margin on both sides; raise it for a
deterministic local model.

Sampling: a table larger than 20x the sample is read through `TABLESAMPLE SYSTEM`
(a few random pages, no full scan), oversampled 5x to allow for pending rows, and
widened 4x per attempt while it yields too few rows; `ORDER BY random()` then picks
N among them. SYSTEM samples whole pages, so rows inserted together are sampled
together; BERNOULLI would sample rows independently but reads every page.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psycopg
from psycopg import sql

from pgreembed.config import Settings
from pgreembed.embedding.embed import embed_rows
from pgreembed.embedding.providers import make_provider
from pgreembed.errors import ProviderError
from pgreembed.observability.redact import redact
from pgreembed.operations.defaults import DEFAULT_TOLERANCE  # noqa: F401  (re-exported)
from pgreembed.store.sampling import tablesample, widening
from pgreembed.store.slots import Slot
from pgreembed.values import Row


@dataclass(frozen=True)
class Disagreement:
    key: Any
    cosine: float  # 0 for an all-zero stored vector


@dataclass
class ColumnVerification:
    """The outcome for one vector column (one slot)."""

    column: str
    role: str
    model: str
    tolerance: float
    sampled: int = 0
    tokens_counted: int = 0  # before sending: tiktoken when available, else an upper bound
    tokens_billed: int = 0  # as the provider reported them
    disagreements: list[Disagreement] = field(default_factory=list)
    not_embeddable: list[tuple[Any, str]] = field(default_factory=list)
    error: str | None = None  # the provider failed: nothing was compared

    def as_dict(self) -> dict[str, Any]:
        return {
            "column": self.column, "role": self.role, "model": self.model,
            "tolerance": self.tolerance, "sampled": self.sampled,
            "tokens_counted": self.tokens_counted, "tokens_billed": self.tokens_billed,
            "disagreements": [{"key": _json_key(d.key), "cosine": d.cosine}
                              for d in self.disagreements],
            "not_embeddable": [{"key": _json_key(k), "reason": r}
                               for k, r in self.not_embeddable],
            "error": self.error,
        }


def _json_key(key: Any) -> Any:
    return key if isinstance(key, int | str) else str(key)


def sample_rows(conn: psycopg.Connection, slot: Slot, size: int
                ) -> list[tuple[Any, str, np.ndarray]]:
    """Up to `size` random (key, text, stored vector) rows that are verifiable now.

    The bookkeeping is looked up per sampled row (LATERAL ... LIMIT 1: a primary-key
    probe), so neither table is read in full on the sampled path."""
    rows = widening(conn, slot.table, size, lambda percent: conn.execute(
        sample_query(slot, percent), (slot.model_id, size)).fetchall())
    return [(key, text, np.asarray(vec, dtype=np.float32)) for key, text, vec in rows]


def sample_query(slot: Slot, percent: float) -> sql.Composed:
    """Verifiable rows among `percent` of the table's pages (all of them at 100), shuffled;
    parameters: the slot's model id, the sample size."""
    return sql.SQL(
        """
        SELECT a.{pk}, ({text})::text, a.{vector}::real[]
        FROM {table} AS a {sample}
        CROSS JOIN LATERAL (SELECT s.pgr_hash FROM {state} s
                            WHERE {key} AND s.pgr_model_id = %s LIMIT 1) s
        WHERE a.{vector} IS NOT NULL AND s.pgr_hash = {hash}
        ORDER BY random() LIMIT %s
        """).format(pk=slot.pk, text=slot.text_expr, vector=slot.vector, table=slot.table,
                    sample=tablesample(percent), state=slot.state_table, key=slot.state_key(),
                    hash=slot.hash_expr)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    norms = float(np.linalg.norm(a)) * float(np.linalg.norm(b))
    return float(np.dot(a, b) / norms) if norms > 0 else 0.0


def verify_slot(conn: psycopg.Connection, settings: Settings, slot: Slot, size: int,
                tolerance: float, announce: Callable[[str], None]) -> ColumnVerification:
    """Sample, announce the tokens it will spend, re-embed, compare. Raises ProviderError."""
    where = f"{slot.target.schema}.{slot.target.table}.{slot.vector_column}"
    result = ColumnVerification(slot.vector_column, slot.role, slot.model_key, tolerance)
    sampled = sample_rows(conn, slot, size)
    result.sampled = len(sampled)
    if not sampled:
        announce(f"verify: {where} ({slot.model_key}): no embedded rows to sample")
        return result
    provider = make_provider(settings, slot.provider, slot.model, slot.dimensions, slot.target)
    texts = [text or "" for _, text, _ in sampled]
    result.tokens_counted = sum(provider.count_tokens(texts))
    announce(f"verify: {where} ({slot.model_key}): re-embedding {len(sampled)} sampled rows:"
             f" {result.tokens_counted:,} tokens or fewer (the tokenizer's count, or a byte"
             " upper bound without it)")
    stored = {key: vector for key, _, vector in sampled}
    outcome = embed_rows([Row(key, text, None) for key, text, _ in sampled], provider,
                         truncate=slot.target.truncate)
    result.tokens_billed = outcome.tokens
    for done in outcome.embedded:
        similarity = cosine(stored[done.row.pk], done.vector)
        if not similarity >= tolerance:
            result.disagreements.append(Disagreement(done.row.pk, round(similarity, 6)))
    result.not_embeddable = [(failed.row.pk, failed.reason) for failed in outcome.failed]
    return result


def verify_slots(conn: psycopg.Connection, settings: Settings, slots: Sequence[Slot], size: int,
                 tolerance: float, announce: Callable[[str], None]
                 ) -> list[ColumnVerification]:
    """Every slot in turn; a provider failure on one column does not stop the others."""
    results = []
    for slot in slots:
        try:
            results.append(verify_slot(conn, settings, slot, size, tolerance, announce))
        except ProviderError as exc:
            results.append(ColumnVerification(slot.vector_column, slot.role, slot.model_key,
                                              tolerance, error=redact(str(exc))))
    return results
