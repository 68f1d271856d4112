"""The passes besides the workers' write: a side fill's copy and the Batch API collector.

Each must never wait on the app's row locks (invariant 10), and must write vectors only
into a column whose registered model made them (invariant 7), on real Postgres.
"""

from __future__ import annotations

import time
from dataclasses import replace

import psycopg
import pytest

from pgreembed.config import load_settings
from pgreembed.errors import MigrationError
from pgreembed.migrations.derive import derives_from
from pgreembed.migrations.lifecycle import BACKLOG, start
from pgreembed.store.backlog import copy_page
from pgreembed.store.pool import connect
from pgreembed.store.rows import lock_free_rows
from pgreembed.store.slots import Slot, load_slots
from pgreembed.testing.fake_openai import FakeOpenAIServer
from tests.helpers import (
    BATCH_LINE,
    Stack,
    assert_column_current,
    counts,
    end_transaction_after,
    fill,
    make_target,
    migrate,
    running,
    seed,
    start_migration,
    wait_filled,
)

HOLD_SECONDS = 1.5  # how long the app keeps its row locked


def _other_model(conn: psycopg.Connection, model: str, dims: int) -> int:
    row = conn.execute("INSERT INTO pgreembed.models (key, provider, name, dimensions)"
                       " VALUES (%s, 'openai', %s, %s) ON CONFLICT (key) DO UPDATE"
                       " SET key = excluded.key RETURNING id",
                       (f"openai:{model}@{dims}", model, dims)).fetchone()
    assert row is not None
    return int(row[0])


def test_a_side_fill_copy_skips_rows_the_app_holds_and_copies_them_after(
        stack: Stack) -> None:
    seed(stack, 50)
    with stack.connect() as conn:  # vectors already paid for, adopted by the first init
        conn.execute("ALTER TABLE docs ADD COLUMN embedding vector(384)")
        fill(conn, "embedding", "fake-384")
    assert stack.cli("init").returncode == 0
    settings = load_settings(stack.config_path, stack.env)
    target = settings.target("docs")
    start(settings, target, "openai", "fake-384", 384, auto_reason=BACKLOG)
    with stack.connect() as conn:
        source, side = load_slots(conn, target)

    app = psycopg.connect(stack.dsn)
    app.execute("UPDATE docs SET views = views + 1 WHERE id = 7")  # held, uncommitted
    timer = end_transaction_after(app, HOLD_SECONDS, commit=True)
    try:
        with connect(stack.dsn, autocommit=True) as conn:
            started = time.monotonic()
            last, copied, busy = copy_page(conn, source, side, None, 1000)
            took = time.monotonic() - started
            assert took < HOLD_SECONDS / 3, f"the copy waited {took:.2f} s on the app"
            assert (last, copied, busy) == (50, 49, 1)
            timer.join()
            assert copy_page(conn, source, side, None, 1000) == (50, 1, 0)
    finally:
        timer.cancel()
        app.close()
    assert_column_current(stack, side.vector_column, "fake-384", 384)

    # The side column's model changed in place: the live column's vectors are not its.
    with stack.connect() as conn:
        conn.execute(f"UPDATE docs SET {side.vector_column} = NULL")
        conn.execute("UPDATE pgreembed.slots SET model_id = %s WHERE id = %s",
                     (_other_model(conn, "fake-alt-384", 384), side.id))
    with connect(stack.dsn, autocommit=True) as conn, pytest.raises(MigrationError):
        copy_page(conn, source, side, None, 1000)


@pytest.mark.parametrize("recorded", [True, False], ids=["recorded", "submitted_before_v5"])
def test_batch_api_results_of_a_model_the_column_no_longer_has_are_dropped(
        stack: Stack, fake_openai: FakeOpenAIServer, recorded: bool) -> None:
    """The model a job asked for is recorded at submit (bookkeeping version 5); a job
    submitted before has none recorded, and its input file tells."""
    seed(stack, 20)
    running(stack)
    wait_filled(stack, "embedding")
    fake_openai.set_faults(batch_delay=1.0)
    column = start_migration(stack, "--model", "fake-768", "--dimensions", "768", "--batch-api")
    submitted = migrate(stack, "batch")
    assert [c[0] for c in counts(BATCH_LINE, submitted)] == [20], submitted
    if not recorded:
        with stack.connect() as conn:
            conn.execute("UPDATE pgreembed.batch_jobs SET asked = NULL")
    # While the job runs, the column's model changes in place to another of the same size.
    with stack.connect() as conn:
        conn.execute("UPDATE pgreembed.slots SET model_id = %s WHERE vector_column = %s",
                     (_other_model(conn, "fake-alt-768", 768), column))
    done = migrate(stack, "batch", "--wait", "--poll", "0.5", "--timeout", "60")
    assert [c[1:4] for c in counts(BATCH_LINE, done)] == [(1, 0, 0)], done
    with stack.connect() as conn:
        billed = dict(conn.execute("SELECT model, sum(inputs) FROM pgreembed.usage"
                                   " GROUP BY model").fetchall())
    assert billed.get("openai:fake-768@768") == 20, billed  # billed as the model it was
    assert fake_openai.stats()["file_downloads"].get("batch", 0) == (0 if recorded else 1)
    # The rows stayed pending: the workers embed them with the column's model.
    wait_filled(stack, column)
    assert_column_current(stack, column, "fake-alt-768", 768)


def test_a_derived_column_is_filled_only_from_the_model_it_derives_from() -> None:
    target = make_target("postgresql:///unused")
    live = Slot(id=1, target=target, vector_column="embedding", role="live", model_id=1,
                model_key="openai:fake-768@768", provider="openai", model="fake-768",
                dimensions=768, primary_key="id", pk_type="bigint")
    shortened = replace(live, id=2, model_id=2, model_key="openai:fake-768@256",
                        dimensions=256, role="next")
    halfvec = replace(live, id=2, role="next", vector_type="halfvec")
    assert derives_from(shortened, live) and derives_from(halfvec, live)
    # `init` changed the live model in place: its vectors are not the new column's model's.
    changed = replace(live, model_id=3, model_key="openai:fake-alt-768@768",
                      model="fake-alt-768")
    assert not derives_from(shortened, changed) and not derives_from(halfvec, changed)


def test_a_write_neither_skips_nor_blocks_a_row_the_app_references(stack: Stack) -> None:
    """An app transaction inserting a row that references ours (a foreign key check takes
    KEY SHARE on it) does not conflict with the lock an UPDATE of the vector takes."""
    seed(stack, 3)
    assert stack.cli("init").returncode == 0
    settings = load_settings(stack.config_path, stack.env)
    with stack.connect() as conn:
        conn.execute("CREATE TABLE notes (id serial PRIMARY KEY,"
                     " doc_id bigint NOT NULL REFERENCES docs (id))")
        (slot,) = load_slots(conn, settings.target("docs"))
    with psycopg.connect(stack.dsn) as app, connect(stack.dsn) as ours:
        app.execute("INSERT INTO notes (doc_id) VALUES (2)")  # uncommitted: KEY SHARE on 2
        assert lock_free_rows(ours, slot, ["1", "2", "3"]) == ({"1", "2", "3"}, set())
        ours.rollback()
        app.execute("UPDATE docs SET views = 1 WHERE id = 3")  # a row lock of the app's
        assert lock_free_rows(ours, slot, ["1", "2", "3"]) == ({"1", "2"}, {"3"})
