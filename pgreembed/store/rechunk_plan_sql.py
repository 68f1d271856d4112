"""The reads of `migrate plan --rechunk` (pgreembed.migrations.rechunk_plan)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from pgreembed.config import Target
from pgreembed.config.chunking import CHUNK_KEY, CHUNK_TEXT
from pgreembed.store.chunks import parent_of, parent_target
from pgreembed.store.slots import Slot, app_table, text_expression
from pgreembed.store.trusted_sql import NO_PARAMS


@dataclass(frozen=True)
class Counts:
    parents: int
    chunks: int
    table_bytes: int


def counts(conn: psycopg.Connection, target: Target) -> Counts:
    row = conn.execute(sql.SQL(
        "SELECT (SELECT count(*) FROM {parent}), (SELECT count(*) FROM {chunks}),"
        " pg_total_relation_size(%s::regclass)").format(
        parent=app_table(parent_target(target)), chunks=app_table(target)),
        (app_table(target).as_string(conn),)).fetchone()
    assert row is not None
    return Counts(int(row[0]), int(row[1]), int(row[2]))


def parent_texts(conn: psycopg.Connection, target: Target, parents: int, limit: int
                 ) -> list[tuple[str | None, Mapping[str, Any]]]:
    """(text, template columns) of every parent, or of a random sample of about `limit`."""
    template = parent_of(target).chunking.template_columns
    sample = (sql.SQL("") if parents <= limit else
              sql.SQL(" TABLESAMPLE BERNOULLI ({})").format(
                  sql.Literal(min(100.0, 100.0 * limit / max(1, parents)))))
    rows = conn.execute(sql.SQL("SELECT ({text})::text{template} FROM {parent}{sample}").format(
        text=text_expression(parent_target(target)),
        template=sql.SQL("").join(sql.SQL(", {}").format(sql.Identifier(c)) for c in template),
        parent=app_table(parent_target(target)), sample=sample), NO_PARAMS).fetchall()
    return [(r[0], dict(zip(template, r[1:], strict=True))) for r in rows]


def embedded_texts(conn: psycopg.Connection, live: Slot, texts: Sequence[str]) -> set[str]:
    """Those of `texts` the live chunk set holds with a vector of its model (what the
    stage copies instead of buying), probed through the state table's hash index."""
    found: set[str] = set()
    for start in range(0, len(texts), 5000):
        part = list(texts[start:start + 5000])
        found.update(r[0] for r in conn.execute(sql.SQL(
            "SELECT DISTINCT l.{chunk} FROM unnest(%s::text[]) t(text)"
            " JOIN {state} s ON s.pgr_model_id = %s"
            " AND s.pgr_hash = md5(t.text)::uuid"
            " JOIN {chunks} l ON l.{uuid} = s.pgr_pk AND l.{chunk} = t.text"
            " WHERE l.{vector} IS NOT NULL").format(
            chunk=sql.Identifier(CHUNK_TEXT), state=live.state_table, chunks=live.table,
            uuid=sql.Identifier(CHUNK_KEY), vector=live.vector), (part, live.model_id)))
    return found
