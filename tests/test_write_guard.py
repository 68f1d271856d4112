"""The no-stale-write guard (invariant 2) with its version shortcut (store.rows.guard).

A row still at the version (xmin) it was read at is written without hashing its text
again; any other row only if its text still hashes to what was embedded. These tests
write through `write_vectors` itself, between a read and an edit done as the app would.
"""

from __future__ import annotations

import numpy as np
import psycopg

from pgreembed.config import parse_settings
from pgreembed.store.pool import connect
from pgreembed.store.rows import load_pending, lock_slot, write_vectors
from pgreembed.store.setup import init_target
from pgreembed.values import Embedded, Row

DIMS = 384


def _target(database_url: str, **extra: object):  # type: ignore[no-untyped-def]
    return parse_settings({"target": [{
        "name": "docs", "table": "public.docs", "text_column": "body",
        "vector_column": "embedding", "provider": "openai", "model": "fake-384",
        "dimensions": DIMS, **extra}]}, {"DATABASE_URL": database_url}).target("docs")


def _read_then_write(database_url: str, target, edit: str) -> tuple[list[Row], list[str]]:  # type: ignore[no-untyped-def]
    """Read rows 1-4 as a batch does, run `edit` as the app (its own transaction), then
    write a vector for each row read; (rows read, keys written)."""
    slot = init_target(database_url, target)
    with connect(database_url) as conn:
        found = lock_slot(conn, target, slot.id, "ACCESS SHARE")
        assert found is not None
        rows = load_pending(conn, found, ["1", "2", "3", "4"])
        conn.commit()
    with psycopg.connect(database_url, autocommit=True) as app:
        app.execute(edit)
    vector = np.full(DIMS, 0.1, dtype=np.float32)
    with connect(database_url) as conn:
        found = lock_slot(conn, target, slot.id, "ROW EXCLUSIVE")
        assert found is not None
        written = write_vectors(conn, found, [Embedded(row, vector) for row in rows])
        conn.commit()
    return rows, sorted(str(k) for k in written.keys)


def _docs(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE docs (id bigint PRIMARY KEY, body text, views int"
                     " NOT NULL DEFAULT 0)")
        conn.execute("INSERT INTO docs (id, body) SELECT g, 'body ' || g"
                     " FROM generate_series(1, 4) g")


def test_rows_edited_after_the_read_are_not_written_and_the_others_are(
        database_url: str) -> None:
    """Row 2's text changed (new version, other text): skipped. Row 3 got a new version
    with the same text (an unrelated column): written, by the hash. Row 4's text changed
    and changed back: written (its text is the one embedded). Row 1: untouched."""
    _docs(database_url)
    rows, written = _read_then_write(
        database_url, _target(database_url),
        "UPDATE docs SET body = 'edited' WHERE id = 2;"
        " UPDATE docs SET views = views + 1 WHERE id = 3;"
        " UPDATE docs SET body = 'x' WHERE id = 4; UPDATE docs SET body = 'body 4' WHERE id = 4")
    assert all(row.version is not None for row in rows)
    assert written == ["1", "3", "4"]
    with psycopg.connect(database_url) as conn:
        stored = conn.execute("SELECT s.pgr_pk, s.pgr_hash = md5(d.body)::uuid"
                              " FROM pgreembed.slot_1 s JOIN docs d ON d.id = s.pgr_pk"
                              " ORDER BY 1").fetchall()
    assert stored == [(1, True), (3, True), (4, True)]


def test_a_text_sql_text_edited_in_another_table_is_not_written(database_url: str) -> None:
    """`text_sql` may read other tables: an edit there changes the text but not the row's
    version, so the version shortcut must not apply (it would write the old text's
    vector for the new text)."""
    _docs(database_url)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE labels (doc_id bigint PRIMARY KEY, label text)")
        conn.execute("INSERT INTO labels SELECT g, 'label ' || g FROM generate_series(1, 4) g")
    target = _target(database_url, text_sql=(
        "body || coalesce((SELECT ' ' || l.label FROM public.labels l"
        " WHERE l.doc_id = id), '')"))  # `id`: the outer row's (labels has none)
    rows, written = _read_then_write(database_url, target,
                                     "UPDATE labels SET label = 'relabelled' WHERE doc_id = 2")
    assert [row.text for row in rows][:2] == ["body 1 label 1", "body 2 label 2"]
    assert written == ["1", "3", "4"]


def test_the_hash_a_batch_reads_is_the_servers_md5_of_the_text(database_url: str) -> None:
    """load_pending hashes the texts in the worker (UTF8 server): the same uuid as
    `Slot.hash_expr`, which the triggers, the state table and the pay-once probe use,
    for non-ASCII text, an empty text and a NULL one."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE docs (id bigint PRIMARY KEY, body text)")
        conn.execute("INSERT INTO docs VALUES (1, 'plain'), (2, 'café ☕ 𝔘 naïve\n\ttab'),"
                     " (3, ''), (4, NULL)")
    target = _target(database_url)
    slot = init_target(database_url, target)
    with connect(database_url) as conn:
        rows = load_pending(conn, slot, ["1", "2", "3", "4"])
        server = dict(conn.execute(
            "SELECT id, md5(coalesce(body::text, ''))::uuid FROM docs").fetchall())
        conn.rollback()
    assert {row.pk: row.content_hash for row in rows} == server
