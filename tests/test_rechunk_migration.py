"""A change of [target.chunking] as a side-by-side migration (scheduler + Redis + worker +
the fake provider): plan, start, fill, index, swap, rollback, finalize, while the app edits
parents and the provider is slow. Every chunk set is checked against the split of its
parent's current text with that set's settings, every chunk's vector against the model's
vector of its text, and pgai's view against the live set."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np
import psycopg
import pytest

from pgreembed.chunking.splitter import chunker
from pgreembed.config import load_settings
from pgreembed.testing.fake_openai import FakeOpenAIServer
from pgreembed.testing.fake_vectors import fake_vector
from tests.app_side import repeatable_read_by_default
from tests.helpers import (
    OrdinaryRoles,
    Stack,
    end_transaction_after,
    in_background,
    json_document,
    migrate,
    wait_for,
    write_config,
)
from tests.test_chunked_pipeline import MODEL, body
from tests.test_chunked_targets import CHUNKED

OLD = CHUNKED.format(batch_size=32, destination='[target.destination]\nview = "docs_view"\n')
NEW = OLD.replace("size = 800\noverlap = 400", "size = 1200\noverlap = 100")
PARENTS, SHORT = 24, 6  # short parents: one chunk, the same in both settings (copied)


def sets(conn: psycopg.Connection, table: str) -> dict[int, list[str]]:
    found: dict[int, list[str]] = {}
    for key, seq, text in conn.execute(f"SELECT id, chunk_seq, chunk FROM {table}"
                                       " ORDER BY id, chunk_seq"):
        assert seq == len(found.setdefault(key, [])), f"{table}: chunk_seq not consecutive"
        found[key].append(text)
    return found


def split_all(conn: psycopg.Connection, target: Any) -> dict[int, list[str]]:
    split = chunker(target.parent.chunking, target.provider, target.model)
    wanted = {key: split(text or "", {"title": title})
              for key, title, text in conn.execute("SELECT id, title, body FROM docs")}
    return {k: v for k, v in wanted.items() if v}


def current(stack: Stack, table: str, target: Any) -> bool:
    """The set in `table` equals the split of every parent's current text, all embedded
    (and none of its parents is marked to chunk again)."""
    dirty_table = "chunk_dirty_docs" + table.removeprefix("docs_chunks")
    with stack.connect() as conn:
        pending = conn.execute(f"SELECT count(*) FROM {table} WHERE embedding IS NULL"
                               ).fetchone()
        dirty = conn.execute(f"SELECT count(*) FROM pgreembed.{dirty_table}").fetchone()
        return pending == (0,) and dirty == (0,) and sets(conn, table) == split_all(conn,
                                                                                    target)


def assert_vectors(stack: Stack, relation: str) -> int:
    with stack.connect() as conn:
        rows = conn.execute(f"SELECT chunk, embedding FROM {relation}").fetchall()
    assert rows
    for text, vector in rows:
        np.testing.assert_allclose(vector.to_numpy(), fake_vector(MODEL, text, 384),
                                   atol=1e-6, err_msg=f"{relation}: {text[:40]!r}")
    return len(rows)


def assert_view_serves(stack: Stack, table: str) -> None:
    with stack.connect() as conn:
        view = sorted(conn.execute("SELECT embedding_uuid, chunk FROM docs_view").fetchall())
        live = sorted(conn.execute(f"SELECT embedding_uuid, chunk FROM {table}").fetchall())
    assert view == live and view


class Writer(threading.Thread):
    """The app: edits of parents 1..10 (a new middle sentence), ~10 a second."""

    def __init__(self, stack: Stack) -> None:
        super().__init__(daemon=True)
        self.stack, self.stop, self.edits, self.version = stack, threading.Event(), 0, 0

    def run(self) -> None:
        with self.stack.connect() as conn:
            while not self.stop.is_set():
                self.version += 1
                key = 1 + self.version % 10
                conn.execute("UPDATE docs SET body = %s WHERE id = %s",
                             (body(random.Random(key), key, f"w{self.version}"), key))
                self.edits += 1
                time.sleep(0.1)


@pytest.mark.timeout(600)
def test_rechunk_migration_side_by_side_under_edits(stack: Stack,
                                                    fake_openai: FakeOpenAIServer) -> None:
    write_config(stack.config_path, OLD)
    old = load_settings(stack.config_path, stack.env).target("docs")
    assert stack.cli("init").returncode == 0
    stack.start_worker(threads=4)
    stack.start_scheduler()
    with stack.connect() as conn:
        for key in range(1, PARENTS + 1):
            conn.execute("INSERT INTO docs (id, title, body) VALUES (%s, %s, %s)",
                         (key, f"t{key}", body(random.Random(key), key, "0")))
        for key in range(PARENTS + 1, PARENTS + SHORT + 1):
            conn.execute("INSERT INTO docs (id, title, body) VALUES (%s, %s, %s)",
                         (key, f"t{key}", f"A short note number {key}."))
    wait_for(lambda: current(stack, "docs_chunks", old), timeout=180, interval=0.5,
             message="the first chunk set embedded")
    with stack.connect() as conn:
        conn.execute("CREATE INDEX docs_chunks_embedding_idx ON docs_chunks"
                     " USING hnsw (embedding vector_cosine_ops)")
        old_texts = {t for chunks in sets(conn, "docs_chunks").values() for t in chunks}

    write_config(stack.config_path, NEW)
    new = load_settings(stack.config_path, stack.env).target("docs")
    init = stack.cli("init")
    assert init.returncode == 0 and "migrate start --target docs --rechunk" in init.stderr
    with stack.connect() as conn:
        assert sets(conn, "docs_chunks") == split_all(conn, old)  # nothing in place
        expected_new = split_all(conn, new)
    plan_run = stack.cli("migrate", "plan", "--target", "docs", "--rechunk", "--json")
    assert plan_run.returncode == 0, plan_run.stdout + plan_run.stderr
    plan = json_document(plan_run.stdout)["rechunk"]
    print(json.dumps({"plan": plan}))

    fake_openai.set_faults(slow_model=MODEL, slow_model_latency=0.3)
    inputs_before = fake_openai.stats()["inputs_embedded"]
    writer = Writer(stack)
    writer.start()
    try:
        out = migrate(stack, "start", "--rechunk")
        assert "re-chunk started" in out
        with stack.connect() as conn:
            row = conn.execute("SELECT table_name FROM pgreembed.slots WHERE target = 'docs'"
                               " AND role = 'next'").fetchone()
        side = f"docs_chunks__c{row[0].rsplit('__c', 1)[1]}"
        assert row[0] == side
        wait_for(lambda: _filled(stack, side), timeout=240, interval=0.5,
                 message="the new chunk set filled")
        migrate(stack, "index")
        swapped = json_document(migrate(stack, "swap", "--json", "--max-unsearchable", "40"))
        assert swapped["pause_ms"] < 1000, swapped
        assert_view_serves(stack, "docs_chunks")
        time.sleep(2.0)  # edits after the swap, into both sets
    finally:
        writer.stop.set()
        writer.join()
    fake_openai.set_faults(slow_model_latency=0.0)
    assert writer.edits > 20

    # After the swap: the live name holds the new settings' split of every current text.
    wait_for(lambda: current(stack, "docs_chunks", new) and current(stack, side, old),
             timeout=180, interval=0.5, message="both sets current after the swap")
    assert_vectors(stack, "docs_chunks")
    assert_vectors(stack, side)
    assert_view_serves(stack, "docs_chunks")
    with stack.connect() as conn:
        indexes = {r[0] for r in conn.execute(
            "SELECT indexname FROM pg_indexes WHERE tablename = 'docs_chunks'")}
    assert "docs_chunks_embedding_idx" in indexes  # the app's index name stays live

    # Plan against what the migration did (the untouched parents 11..50 are as planned).
    with stack.connect() as conn:
        built = sets(conn, "docs_chunks")
    assert abs(plan["chunks_after"] - sum(map(len, built.values()))) <= 0.2 * plan[
        "chunks_after"]
    planned_new = {t for k, chunks in expected_new.items() for t in chunks
                   if t not in old_texts}
    counts = fake_openai.stats()["text_counts"]
    assert abs(plan["texts_to_embed"] - len(planned_new)) <= 0.2 * len(planned_new)
    untouched = {t for k, chunks in expected_new.items() if k > 10 for t in chunks
                 if t not in old_texts}  # the writer edits parents 1..10
    assert untouched and all(counts.get(t, 0) >= 1 for t in untouched)
    reused = {t for k, chunks in expected_new.items() for t in chunks if t in old_texts}
    assert reused and plan["chunks_reused"] >= len(reused)
    assert all(counts.get(t) == 1 for t in reused), "a text the live set had was bought again"
    print(json.dumps({"edits": writer.edits, "swap": swapped,
                      "inputs": fake_openai.stats()["inputs_embedded"] - inputs_before,
                      "planned_new": len(planned_new)}))

    # Rollback: the previous set is live again, current for the edits made since.
    migrate(stack, "rollback")
    assert current(stack, "docs_chunks", old) and current(stack, side, new)
    assert_vectors(stack, "docs_chunks")
    assert_view_serves(stack, "docs_chunks")

    migrate(stack, "swap")
    migrate(stack, "finalize")
    with stack.connect() as conn:
        assert conn.execute("SELECT to_regclass(%s)", (side,)).fetchone() == (None,)
        triggers = {r[0] for r in conn.execute(
            "SELECT tgname FROM pg_trigger WHERE tgrelid = 'docs'::regclass")}
        conn.execute("UPDATE docs SET body = body || ' Final.' WHERE id = 3")
    assert not any("__c" in t for t in triggers), triggers
    wait_for(lambda: current(stack, "docs_chunks", new), timeout=120, interval=0.5,
             message="edits after finalize")
    assert_vectors(stack, "docs_chunks")
    assert_view_serves(stack, "docs_chunks")
    assert stack.cli("init").returncode == 0
    assert "rechunk" not in stack.cli("init").stderr


def _filled(stack: Stack, side: str, parents_wanted: int = PARENTS + SHORT) -> bool:
    """Every parent chunked into the new set, and no more than the writer keeps pending."""
    with stack.connect() as conn:
        parents, pending = conn.execute(
            f"SELECT count(DISTINCT id), count(*) FILTER (WHERE embedding IS NULL) FROM {side}"
        ).fetchone()
    print(json.dumps({"side_parents": parents, "side_pending": pending}))
    return bool(parents == parents_wanted and pending <= 30)


@pytest.mark.timeout(300)
def ten_parents_chunked(stack: Stack) -> None:
    """`init` with the OLD settings, parents 1..10, chunked by the stage (no worker: no
    vectors), as a tick would."""
    from pgreembed.chunking.stage import run_chunk_stage
    from pgreembed.store.pool import connect

    write_config(stack.config_path, OLD)
    assert stack.cli("init").returncode == 0
    with stack.connect() as conn:
        for key in range(1, 11):
            conn.execute("INSERT INTO docs (id, title, body) VALUES (%s, %s, %s)",
                         (key, f"t{key}", body(random.Random(key), key, "0")))
    with connect(stack.dsn) as conn:
        run_chunk_stage(conn, load_settings(stack.config_path, stack.env))


def test_rechunk_start_crash_refusals_and_cancel(stack: Stack) -> None:
    """No scheduler or worker: `start --rechunk` killed right after its commit is finished
    by running it again (one migration, its pending index made); a swap is refused,
    nothing changed, while an app function is bound to the chunk table; cancel drops the
    new set, its triggers and slot, and leaves the live set as it was."""
    from pgreembed.chunking.stage import run_chunk_stage
    from pgreembed.store.pool import connect

    ten_parents_chunked(stack)
    with stack.connect() as conn:
        before = sets(conn, "docs_chunks")
        triggers_before = {r[0] for r in conn.execute(
            "SELECT tgname FROM pg_trigger WHERE tgrelid = 'docs'::regclass")}
    refused = stack.cli("migrate", "start", "--target", "docs", "--rechunk")
    assert refused.returncode == 4 and "nothing to re-chunk" in refused.stderr, refused.stderr

    write_config(stack.config_path, NEW)
    crashed = subprocess.run([sys.executable, "-m", "pgreembed", "migrate", "start",
                              "--target", "docs", "--rechunk"],
                             env={**stack.env, "PGREEMBED_CRASH_AT": "start"},
                             capture_output=True, text=True, timeout=120)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    migrate(stack, "start", "--rechunk")  # again: finds its migration
    with stack.connect() as conn:
        (slot,) = conn.execute("SELECT id FROM pgreembed.slots WHERE role = 'next'").fetchone()
        assert conn.execute("SELECT count(*) FROM pgreembed.migrations").fetchone() == (1,)
        assert conn.execute("SELECT to_regclass(%s)",
                            (f"public.pgreembed_pending_{slot}",)).fetchone() != (None,)
        assert conn.execute(f"SELECT count(*) FROM pgreembed.chunk_dirty_docs__c{slot}"
                            ).fetchone() == (10,)
        conn.execute("CREATE FUNCTION chunk_count() RETURNS bigint LANGUAGE sql"
                      " BEGIN ATOMIC SELECT count(*) FROM docs_chunks; END")
    blocked = stack.cli("migrate", "swap", "--target", "docs", "--timeout", "1")
    assert blocked.returncode == 4 and "function public.chunk_count()" in blocked.stderr, (
        blocked.stderr)
    with stack.connect() as conn:
        conn.execute("DROP FUNCTION chunk_count()")
    with connect(stack.dsn) as conn:  # the stage fills the new set (no worker: no vectors)
        run_chunk_stage(conn, load_settings(stack.config_path, stack.env))
    with stack.connect() as conn:
        assert len(sets(conn, f"docs_chunks__c{slot}")) == 10
    assert "cancelled" in migrate(stack, "cancel")
    with stack.connect() as conn:
        assert sets(conn, "docs_chunks") == before
        assert conn.execute("SELECT to_regclass(%s)", (f"docs_chunks__c{slot}",)
                            ).fetchone() == (None,)
        assert {r[0] for r in conn.execute(
            "SELECT tgname FROM pg_trigger WHERE tgrelid = 'docs'::regclass")} == triggers_before
        assert conn.execute("SELECT role FROM pgreembed.slots WHERE id = %s", (slot,)
                            ).fetchone() == ("dropped",)


@pytest.mark.timeout(600)
def test_rechunk_as_ordinary_roles_under_repeatable_read(
        ordinary_roles: tuple[Stack, OrdinaryRoles], fake_openai: FakeOpenAIServer) -> None:
    """As users' databases are: pgreembed a plain member of the owner role, REPEATABLE READ
    by default, the app's own view over the chunk table (owned by the owner role), app
    transactions holding a parent row across `start` and reading the view across the
    swap, and the app editing parents throughout: the app reads the live set through its
    view after the swap and the rollback, and none of its statements fails."""
    stack, roles = ordinary_roles
    repeatable_read_by_default(stack)
    write_config(stack.config_path, OLD)
    old = load_settings(stack.config_path, stack.env).target("docs")
    out = stack.cli("init")
    assert out.returncode == 0, out.stderr
    with stack.connect() as conn:
        for role in (roles.owner, roles.app):
            conn.execute(f'GRANT SELECT ON docs_chunks TO "{role}"')
        conn.execute("CREATE VIEW app_chunks AS SELECT id, chunk_seq, chunk, embedding"
                     " FROM docs_chunks")
        conn.execute(f'ALTER VIEW app_chunks OWNER TO "{roles.owner}"')
        conn.execute(f'GRANT SELECT ON app_chunks TO "{roles.app}"')
    fake_openai.set_faults(slow_model=MODEL, slow_model_latency=0.3)
    stack.start_worker(threads=4)
    stack.start_scheduler()
    with psycopg.connect(roles.app_dsn, autocommit=True) as app:
        for key in range(1, 13):
            app.execute("INSERT INTO docs (id, title, body) VALUES (%s, %s, %s)",
                        (key, f"t{key}", body(random.Random(key), key, "0")))
    wait_for(lambda: current(stack, "docs_chunks", old), timeout=180, interval=0.5,
             message="the first set embedded")
    write_config(stack.config_path, NEW)
    new = load_settings(stack.config_path, stack.env).target("docs")
    errors: list[str] = []

    def edit(stop: threading.Event) -> None:
        version = 0
        with psycopg.connect(roles.app_dsn, autocommit=True) as app:
            while not stop.is_set():
                version += 1
                key = 1 + version % 5
                try:
                    app.execute("UPDATE docs SET body = %s WHERE id = %s",
                                (body(random.Random(key), key, f"e{version}"), key))
                except psycopg.Error as exc:
                    errors.append(f"edit: {exc}")
                time.sleep(0.1)

    def read(stop: threading.Event) -> None:
        with psycopg.connect(roles.app_dsn) as app:  # REPEATABLE READ transactions
            while not stop.is_set():
                try:
                    app.execute("SELECT count(*) FROM app_chunks").fetchone()
                    time.sleep(0.3)  # holds its snapshot and ACCESS SHARE a while
                    app.commit()
                    time.sleep(0.3)  # (an app that never lets go blocks any swap)
                except psycopg.Error as exc:
                    app.rollback()
                    errors.append(f"read: {exc}")

    with in_background(edit, read):
        with psycopg.connect(roles.app_dsn) as holder:  # holds parent 9 across start
            holder.execute("UPDATE docs SET views = views + 1 WHERE id = 9")
            end_transaction_after(holder, 1.0, commit=True)
            migrate(stack, "start", "--rechunk")
        with stack.connect() as conn:
            (side,) = conn.execute("SELECT table_name FROM pgreembed.slots"
                                   " WHERE role = 'next'").fetchone()
        wait_for(lambda: _filled(stack, side, 12), timeout=240, interval=0.5,
                 message="the new set filled")
        migrate(stack, "swap", "--max-unsearchable", "30")
        time.sleep(1.0)
    fake_openai.set_faults(slow_model_latency=0.0)
    assert errors == []
    wait_for(lambda: current(stack, "docs_chunks", new) and current(stack, side, old),
             timeout=180, interval=0.5, message="both sets current")
    with psycopg.connect(roles.app_dsn, autocommit=True) as app:
        through_view = sorted(app.execute("SELECT id, chunk_seq, chunk FROM app_chunks"))
    with stack.connect() as conn:
        assert through_view == sorted(conn.execute("SELECT id, chunk_seq, chunk"
                                                   " FROM docs_chunks"))
        assert sets(conn, "docs_chunks") == split_all(conn, new)
    assert_vectors(stack, "docs_chunks")
    migrate(stack, "rollback")
    with psycopg.connect(roles.app_dsn, autocommit=True) as app:
        through_view = sorted(app.execute("SELECT id, chunk_seq, chunk FROM app_chunks"))
    with stack.connect() as conn:
        assert through_view == sorted(conn.execute("SELECT id, chunk_seq, chunk"
                                                   " FROM docs_chunks"))
        assert sets(conn, "docs_chunks") == split_all(conn, old)
    migrate(stack, "finalize")
    assert_vectors(stack, "docs_chunks")


def test_a_rechunks_new_set_goes_on_the_backfill_queue(stack: Stack) -> None:
    """The scheduler's pass (real broker, real Redis, no worker) sends the new set's
    parents (all dirty at `start --rechunk`) as `chunk_backfill_parents` on the backfill
    queue, and an edited parent of the live set as `chunk_parents` on the main queue, so
    a live edit is not kept behind the re-chunk's batches (pgreembed.queue.contract)."""
    import redis

    from pgreembed.queue import contract
    from pgreembed.store.pool import connect
    from scheduler.dispatch import Dispatcher, dramatiq_senders

    ten_parents_chunked(stack)
    write_config(stack.config_path, NEW)
    migrate(stack, "start", "--rechunk")
    with stack.connect() as conn:
        conn.execute("UPDATE docs SET body = body || ' One more sentence.' WHERE id = 3")
    settings = load_settings(stack.config_path, stack.env)
    client = redis.Redis.from_url(settings.redis_url)
    send, send_chunks = dramatiq_senders(settings)
    with connect(stack.dsn) as conn:
        Dispatcher(settings, client, send, send_chunks=send_chunks).run_pass(conn)

    def queued(queue: str) -> list[tuple[str, str, list[str]]]:
        return [(m["actor_name"], m["args"][1], m["args"][2]) for m in (
            json.loads(raw) for raw in client.hvals(f"dramatiq:{queue}.msgs"))
            if m["actor_name"] in (contract.CHUNK_ACTOR, contract.BACKFILL_CHUNK_ACTOR)]

    main, backfill = queued(contract.QUEUE), queued(contract.BACKFILL_QUEUE)
    assert [(actor, keys) for actor, _, keys in main] == [(contract.CHUNK_ACTOR, ["3"])], main
    assert {actor for actor, _, _ in backfill} == {contract.BACKFILL_CHUNK_ACTOR}, backfill
    assert sorted(int(k) for _, _, keys in backfill for k in keys) == list(range(1, 11))
    assert {chunk_set for _, chunk_set, _ in backfill} != {chunk_set for _, chunk_set, _ in main}
