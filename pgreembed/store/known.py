"""Vectors a slot's model already made from a text: what a batch copies instead of buying.

Looked up through the state table's (model, text hash) index, one probe per distinct
hash (never a scan, however many rows share a boilerplate text). A source row counts
only if its vector is there and its text still hashes to what its state row says, so
the vector copied is the model's vector for exactly that text.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import numpy as np
import psycopg
from psycopg import sql

from pgreembed.store.slots import Slot
from pgreembed.store.texts import is_no_text
from pgreembed.values import Row


def known_vectors(conn: psycopg.Connection, slot: Slot, rows: Sequence[Row]
                  ) -> dict[uuid.UUID, tuple[np.ndarray, bool]]:
    """{text hash: (vector, truncated)} for the rows' texts some other row holds already.

    Call it under `lock_slot` in the transaction that loaded the rows: the column read
    is then the slot's, and its vectors are the slot's model's (see `lock_slot`).
    """
    hashes = sorted({r.content_hash for r in rows
                     if r.text is not None and not is_no_text(r.text)})
    if not hashes:
        return {}
    query = sql.SQL(
        """
        SELECT h.hash, v.vec, v.truncated
        FROM unnest(%b::uuid[]) AS h(hash)
        CROSS JOIN LATERAL (
            SELECT a.{vector} AS vec, s.pgr_truncated AS truncated
            FROM {rows}
            WHERE s.pgr_model_id = %s AND s.pgr_hash = h.hash
              AND a.{vector} IS NOT NULL AND {hash} = s.pgr_hash
            LIMIT 1
        ) v
        """
    ).format(vector=slot.vector, rows=slot.rows_with_state(), hash=slot.hash_expr)
    found = {}
    for content_hash, vector, truncated in conn.execute(query, (hashes, slot.model_id)):
        found[content_hash] = (np.asarray(vector.to_numpy(), dtype=np.float32), bool(truncated))
    return found
