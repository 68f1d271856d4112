"""A batch's write holds the app's rows briefly, however slow each row's write is: it
commits in slices sized by the measured time per row (store.write_slices).

A row whose write costs milliseconds (an HNSW insert per non-HOT update; here the app's
own per-row trigger, which sleeps as long) made a 256-row batch hold its rows for
seconds, and every app transaction touching one of them waited that long. And the
slices keep pay-once: a database fault between two slices leaves the vectors of the
slices not written in Redis, written by the next pass without a provider request, with
the spend on the ledger once.
"""

from __future__ import annotations

import dataclasses
import json

import redis

from pgreembed.store.write_slices import PROBE_ROWS, WriteSlicer
from pgreembed.testing.fake_openai import FakeOpenAIServer
from tests.app_side import (
    app_transactions,
    assert_app_reads_live,
    create_app_objects,
    repeatable_read_by_default,
)
from tests.helpers import (
    OrdinaryRoles,
    Stack,
    assert_column_current,
    docs_config,
    json_document,
    seed,
    steady_writer,
    vectors_in,
    wait_filled,
    wait_for,
    write_config,
)

ROWS = 1000
ROW_WRITE_SECONDS = 0.008  # what an HNSW insert can cost per row on a large graph

SLOW_ROW_TRIGGER = f"""
CREATE FUNCTION docs_audit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_sleep({ROW_WRITE_SECONDS});
    RETURN NEW;
END $$;
CREATE TRIGGER docs_audit BEFORE UPDATE OF embedding ON docs
    FOR EACH ROW EXECUTE FUNCTION docs_audit();
"""


def test_app_transactions_wait_on_a_slice_not_on_the_whole_batch(
        ordinary_roles: tuple[Stack, OrdinaryRoles], fake_openai: FakeOpenAIServer) -> None:
    stack, roles = ordinary_roles
    repeatable_read_by_default(stack)
    app = dataclasses.replace(stack, dsn=roles.app_dsn)
    # 256-row batches at 8 ms a row: 2 s of row locks each, unsliced. With the opt-in
    # prepared statements: the suite's other write-path tests run without them.
    write_config(stack.config_path, docs_config(batch_size=256, max_inflight_rows=1024,
                                                worker_extra="prepared_statements = true"))
    seed(stack, ROWS)
    assert stack.cli("init").returncode == 0
    create_app_objects(stack, roles)
    with stack.connect() as conn:
        conn.execute(SLOW_ROW_TRIGGER)
    fake_openai.set_faults(latency=0.3)
    with steady_writer(app, per_second=10.0, edits=range(1, ROWS + 1)) as writer, \
            app_transactions(roles.app_dsn, range(1, 201)) as transactions:
        stack.start_worker(threads=2)
        stack.start_scheduler()
        wait_for(lambda: vectors_in(stack, "embedding") >= ROWS // 2, timeout=120, interval=0.2,
                 message="half the rows written, the app writing and holding rows")
    fake_openai.set_faults(latency=0.0)
    wait_filled(stack, "embedding")
    assert writer["edits"] > 5 and writer["errors"] <= writer["edits"] // 10
    assert transactions.done > 10 and transactions.errors == []
    # The app's transactions waited at most a slice (~50 ms, the probe slice 64 ms) and
    # their own statements' noise; unsliced, up to a 2 s batch.
    print(json.dumps({"held": transactions.held, "done": transactions.done}))
    assert max(transactions.held, default=0.0) < 0.6, transactions
    assert_column_current(stack, "embedding", "fake-384", 384)
    assert_app_reads_live(roles)


FAULT_AFTER_FIRST_SLICE = f"""
CREATE TABLE write_fault (on_ boolean NOT NULL);
INSERT INTO write_fault VALUES (true);
CREATE FUNCTION docs_fault() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- A fault of the database (not of a row) once the first slice's rows have vectors
    -- (its own earlier rows are visible here, the row at hand is not): the batch's first
    -- slice commits, its later slices fail.
    IF (SELECT on_ FROM write_fault)
            AND (SELECT count(embedding) FROM docs) >= {PROBE_ROWS} THEN
        RAISE EXCEPTION 'could not extend file: No space left on device'
            USING ERRCODE = '53100';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER docs_fault BEFORE UPDATE OF embedding ON docs
    FOR EACH ROW EXECUTE FUNCTION docs_fault();
"""


def test_a_fault_between_slices_keeps_the_rest_paid_once(
        stack: Stack, fake_openai: FakeOpenAIServer) -> None:
    rows = 64
    write_config(stack.config_path, docs_config(batch_size=rows, max_inflight_rows=rows,
                                                worker_extra="write_retry_seconds = 0.5"))
    seed(stack, rows, body="body of ")
    assert stack.cli("init").returncode == 0
    with stack.connect() as conn:
        conn.execute(FAULT_AFTER_FIRST_SLICE)
    stack.start_worker(threads=2)
    assert stack.cli("tick").returncode == 0
    # The first slice of a fresh process is its probe (8 rows); the rest is kept.
    client = redis.Redis.from_url(stack.redis_url)
    wait_for(lambda: "the write stopped after" in stack.log_text(), timeout=60,
             message="the first slice written, the next one refused")
    assert len(client.keys("pgreembed:paid:*")) == rows - vectors_in(stack, "embedding")
    assert vectors_in(stack, "embedding") == PROBE_ROWS
    assert fake_openai.stats()["inputs_embedded"] == rows
    with stack.connect() as conn:
        conn.execute("UPDATE write_fault SET on_ = false")
    stack.start_scheduler()
    wait_filled(stack, "embedding")
    stats = fake_openai.stats()
    assert stats["inputs_embedded"] == rows and max(stats["text_counts"].values()) == 1
    assert_column_current(stack, "embedding", "fake-384", 384)
    failures = json_document(stack.cli("failures", "--target", "docs", "--json").stdout)
    assert failures["failures"] == []
    wait_for(lambda: client.keys("pgreembed:paid:*") == [], timeout=10,
             message="kept vectors forgotten once written")
    with stack.connect() as conn:  # the spend on the ledger once
        inputs, tokens = conn.execute("SELECT sum(inputs), sum(tokens) FROM pgreembed.usage"
                                      ).fetchone()
    assert (inputs, tokens) == (rows, stats["tokens_embedded"])


def test_a_slice_fits_the_budget_at_the_measured_pace_and_grows_at_most_twofold() -> None:
    slicer = WriteSlicer(budget_seconds=0.05)
    column = (1, "embedding")
    assert slicer.size(column) == PROBE_ROWS  # nothing measured yet: the probe
    slicer.observe(column, 8, 0.04)  # 5 ms a row: 10 rows fit 50 ms
    assert slicer.size(column) == 10
    slicer.observe(column, 0, 5.0)  # nothing written (rows held, changed): nothing learnt
    assert slicer.size(column) == 10
    fast = (1, "embedding_next")
    slicer.observe(fast, 8, 0.0008)  # 0.1 ms a row: 500 fit, but 8 measured: at most 16
    assert slicer.size(fast) == 16
    slicer.observe(fast, 16, 0.0016)
    assert slicer.size(fast) == 32
    items, rest = slicer.take(fast, list(range(40)))
    assert (items, rest) == (list(range(32)), list(range(32, 40)))
    # A batch's remainder, a small slice at the same pace, does not shrink what the pace
    # is trusted with: the next batch's slice is not cut back to twice the remainder
    # (it was: each batch of 512 split 500 + 12 then ramped up again from 24).
    slicer.observe(fast, 32, 0.0032)
    slicer.observe(fast, 8, 0.0008)  # the remainder, rows 32-39
    assert slicer.size(fast) == 64
