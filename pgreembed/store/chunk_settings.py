"""The settings each chunk set was made with, recorded beside it.

A chunk table holds the chunks of one `[target.chunking]`; the config says what is
wanted. They differ after the config changes, and then the set must stay as it was made
(a change is a re-chunk migration, side by side: migrations.rechunk), so the chunk stage
splits with the recorded settings, never the config's. They are recorded as the comment
of the set's dirty table (`pgreembed chunking <key> <json>`): a re-chunk swap renames the
dirty tables with the chunk tables, and a comment moves with its table.
"""

from __future__ import annotations

import dataclasses
import json

import psycopg
from psycopg import sql

from pgreembed.config import Target
from pgreembed.config.chunking import Chunking

PREFIX = "pgreembed chunking "


def to_json(chunking: Chunking) -> str:
    return json.dumps(dataclasses.asdict(chunking), sort_keys=True)


def from_json(text: str) -> Chunking:
    raw = json.loads(text)
    raw["separators"] = tuple(raw["separators"])
    return Chunking(**raw)


def comment(key: str, chunking: Chunking) -> str:
    """The dirty table's comment: the key chunks.chunking_key compares, then the settings."""
    return f"{key} {to_json(chunking)}"


def parse(found: str | None) -> tuple[str | None, Chunking | None]:
    """(key, settings) of a dirty table's comment; settings None when the comment predates
    them (a key alone) or there is none."""
    if not found or not found.startswith(PREFIX):
        return None, None
    head, _, rest = found[len(PREFIX):].partition(" ")
    key = PREFIX + head
    if not rest:
        return key, None
    try:
        return key, from_json(rest)
    except (ValueError, TypeError, KeyError):
        return key, None


def read_comment(conn: psycopg.Connection, dirty: sql.Identifier) -> str | None:
    row = conn.execute("SELECT obj_description(to_regclass(%s), 'pg_class')",
                       (dirty.as_string(conn),)).fetchone()
    return None if row is None else row[0]


def recorded(conn: psycopg.Connection, dirty: sql.Identifier) -> Chunking | None:
    """The settings the chunk set served by `dirty` was made with (None: not recorded)."""
    return parse(read_comment(conn, dirty))[1]


def with_chunking(target: Target, chunking: Chunking) -> Target:
    """`target` splitting with `chunking` (what the chunk stage uses for one set)."""
    assert target.parent is not None
    return dataclasses.replace(target, parent=dataclasses.replace(target.parent,
                                                                   chunking=chunking))
