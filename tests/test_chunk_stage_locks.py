"""The chunk stage holds the app's parents only for its last round trips (issue 25, test
4's "no app query stalled over 100 ms"): an app edit of a parent the stage is matching
does not wait for the stage's Python work or its reads, and its new text still wins."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

import pgreembed.chunking.stage as stage_module
from pgreembed.chunking.stage import rechunk
from pgreembed.store.pool import connect
from tests.helpers import Stack
from tests.test_chunked_targets import chunk_sets, chunked_stack, dirty, drain, init

APP_LOCK_TIMEOUT = "100ms"  # the bar: an edit held longer fails, it is not timed


def test_app_edit_during_the_stage_match_does_not_wait(
        stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    chunked_stack(stack)
    target = init(stack)
    with stack.connect() as conn:
        conn.execute("INSERT INTO docs (title, body) VALUES ('a', 'first'), ('b', 'other')")
    drain(stack.dsn, target)
    with stack.connect() as conn:
        conn.execute("UPDATE docs SET body = 'second' WHERE id = 1")  # dirty again
    outcomes: list[str] = []
    real = stage_module.match

    def match_while_the_app_edits(*args: Any) -> Any:
        # The app edits the parent being matched, in its own session, capped as its
        # statements are in test 4: the stage is in the middle of this very batch.
        if not outcomes:
            with psycopg.connect(stack.dsn, autocommit=True) as app:
                app.execute(f"SET lock_timeout = '{APP_LOCK_TIMEOUT}'")
                try:
                    app.execute("UPDATE docs SET body = 'third' WHERE id = 1")
                    outcomes.append("done")
                except psycopg.errors.LockNotAvailable:
                    outcomes.append("held by the stage over 100 ms")
        return real(*args)

    monkeypatch.setattr(stage_module, "match", match_while_the_app_edits)
    with connect(stack.dsn) as conn:
        applied = rechunk(conn, target)
    monkeypatch.undo()
    assert outcomes == ["done"]
    # What the stage split ('second') is stale now: left dirty, not written.
    assert (applied.parents, applied.stale) == (0, 1)
    with stack.connect() as conn:
        assert dirty(conn) == {1}
        assert chunk_sets(conn) == {1: ["a: first"], 2: ["b: other"]}
    drain(stack.dsn, target)
    with stack.connect() as conn:
        assert chunk_sets(conn) == {1: ["a: third"], 2: ["b: other"]} and dirty(conn) == set()


def test_a_lock_timeout_in_the_write_pipeline_gives_the_batch_back(stack: Stack) -> None:
    """The writes (and the COMMIT) travel in one pipeline after the parents' lock: a lock
    wait there over the stage's lock_timeout (here its INSERT of a new chunk behind
    another transaction's uncommitted row at the same position) rolls the whole batch
    back, marks included, and leaves no transaction open."""
    chunked_stack(stack)
    target = init(stack)
    with stack.connect() as conn:
        conn.execute("INSERT INTO docs (title, body) VALUES ('a', 'first'), ('b', 'other')")
    drain(stack.dsn, target)
    longer = "\n\n".join(f"paragraph {p} " + "word " * 100 for p in range(4))  # 2+ chunks
    with stack.connect() as conn:
        conn.execute("UPDATE docs SET body = %s WHERE id = 1", (longer,))
    with psycopg.connect(stack.dsn) as holder:
        held = holder.execute(
            "INSERT INTO docs_chunks (embedding_uuid, id, chunk_seq, chunk)"
            " SELECT gen_random_uuid(), 1, s, 'held' FROM generate_series(0, 20) s"
            " WHERE NOT EXISTS (SELECT FROM docs_chunks WHERE id = 1 AND chunk_seq = s)"
        ).rowcount
        assert held > 0
        with connect(stack.dsn) as conn:
            applied = rechunk(conn, target)
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        holder.rollback()
    assert (applied.parents, applied.stale) == (0, 1)
    with stack.connect() as conn:
        assert dirty(conn) == {1}
        assert chunk_sets(conn) == {1: ["a: first"], 2: ["b: other"]}
    drain(stack.dsn, target)
    with stack.connect() as conn:
        assert dirty(conn) == set() and len(chunk_sets(conn)[1]) >= 2
