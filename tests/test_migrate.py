"""Re-embedding migrations on real services, with real workers and scheduler running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import psycopg
import pytest

from pgreembed.config import parse_settings
from pgreembed.migrations.crash_point import CRASH_AT
from pgreembed.operations.search import search
from pgreembed.store import server_versions
from tests.helpers import (
    ROOT,
    Stack,
    assert_column_current,
    column_type,
    counts,
    end_transaction_after,
    in_background,
    json_document,
    migrate,
    require_server,
    running,
    seed,
    start_migration,
    wait_filled,
    wait_for,
)


def schema_snapshot(stack: Stack) -> dict[str, object]:
    with stack.connect() as conn:
        return {
            "columns": conn.execute(
                "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute WHERE"
                " attrelid = 'docs'::regclass AND attnum > 0 AND NOT attisdropped"
                " ORDER BY attnum").fetchall(),
            "indexes": conn.execute("SELECT indexname, indexdef FROM pg_indexes WHERE"
                                    " tablename = 'docs' ORDER BY 1").fetchall(),
            "triggers": conn.execute("SELECT tgname, pg_get_triggerdef(oid) FROM pg_trigger"
                                     " WHERE tgrelid = 'docs'::regclass AND NOT tgisinternal"
                                     " ORDER BY 1").fetchall(),
            "function": conn.execute("SELECT prosrc FROM pg_proc WHERE proname = 'clear_docs'"
                                     ).fetchall(),
        }


def hold_table(stack: Stack, seconds: float | None = None) -> psycopg.Connection:
    """A transaction holding docs in ACCESS SHARE mode (a long query, to a swap or a
    DROP COLUMN), released after `seconds` or when the caller closes it."""
    blocker = psycopg.connect(stack.dsn)
    blocker.execute("LOCK TABLE docs IN ACCESS SHARE MODE")
    if seconds is not None:
        end_transaction_after(blocker, seconds)
    return blocker


def status_roles(text: str) -> dict[str, str]:
    """`status`'s column -> role, read from its table (header: target column role ...)."""
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["target", "column", "role"], lines[0]
    rows = [line.split() for line in lines[1:] if line.startswith("docs ")]
    return {row[1]: row[2] for row in rows}


@pytest.mark.second_server
def test_full_migration_swap_rollback_finalize(stack: Stack) -> None:
    seed(stack, 60)
    running(stack)
    wait_filled(stack, "embedding")
    plan = json_document(migrate(stack, "plan", "--model", "fake-768", "--dimensions", "768",
                                 "--json"))
    assert (plan["rows"], plan["column_type"]) == (60, "vector(768)")
    assert any(s.startswith('ALTER TABLE "public"."docs" ADD COLUMN')
               for s in plan["statements"]), plan["statements"]
    assert "estimated time: no rate limit configured" in migrate(
        stack, "plan", "--model", "fake-768", "--dimensions", "768")
    new_column = start_migration(stack, "--model", "fake-768", "--dimensions", "768")
    assert column_type(stack, new_column) == "vector(768)"
    # Traffic during the backfill: inserts, text updates, deletes.
    with stack.connect() as conn:
        conn.execute("INSERT INTO docs (title, body) VALUES ('during', 'the backfill')")
        conn.execute("UPDATE docs SET body = 'edited during backfill' WHERE id IN (3, 30)")
        conn.execute("DELETE FROM docs WHERE id = 7")
    wait_filled(stack, new_column)
    wait_filled(stack, "embedding")
    status = json_document(migrate(stack, "status", "--json"))
    assert (status["done"], status["phase"]) == (60, "filling")
    overall = stack.cli("status")
    assert counts(r"migration of docs: \[#{30}\] ~(\d+)/~(\d+) rows", overall.stdout) == [
        (60, 60)], overall.stdout
    assert status_roles(overall.stdout) == {"embedding": "live", new_column: "incoming"}
    # No index on the new column yet while the live one has one: refused.
    refused = stack.cli("migrate", "swap", "--target", "docs")
    assert refused.returncode == 4 and "run `migrate index`" in refused.stderr
    assert "is valid" in migrate(stack, "index")
    assert "swap done" in migrate(stack, "swap")
    swapped = stack.cli("status").stdout
    assert status_roles(swapped) == {"embedding": "live", new_column: "old"}
    [line] = [line for line in swapped.splitlines() if line.startswith("migration of docs:")]
    assert line.startswith(f"migration of docs: swapped; {new_column} (openai:fake-384@384)"
                           " kept current") and "[#" not in line, line
    assert column_type(stack, "embedding") == "vector(768)"
    assert column_type(stack, new_column) == "vector(384)"
    assert_column_current(stack, "embedding", "fake-768", 768)
    with stack.connect() as conn:
        index = conn.execute("SELECT indexdef FROM pg_indexes WHERE indexname ="
                             " 'docs_embedding_idx'").fetchone()[0]
        assert "(embedding vector_cosine_ops)" in index
        assert conn.execute("SELECT model, dimensions FROM pgreembed.active_models"
                            ).fetchone() == ("fake-768", 768)
    # Writes between swap and rollback must be right in both columns after rollback.
    with stack.connect() as conn:
        conn.execute("UPDATE docs SET title = 'after swap' WHERE id = 11")
        conn.execute("INSERT INTO docs (title, body) VALUES ('inserted', 'after swap')")
    wait_filled(stack, "embedding")
    wait_filled(stack, new_column)
    assert "rollback done" in migrate(stack, "rollback")
    assert column_type(stack, "embedding") == "vector(384)"
    assert_column_current(stack, "embedding", "fake-384", 384)
    assert_column_current(stack, new_column, "fake-768", 768)
    # Forward again, then drop the previous column.
    assert "swap done" in migrate(stack, "swap")
    migrate(stack, "finalize")
    assert column_type(stack, new_column) is None
    assert column_type(stack, "embedding") == "vector(768)"
    with stack.connect() as conn:
        conn.execute("UPDATE docs SET body = 'after finalize' WHERE id = 12")
    wait_filled(stack, "embedding")
    assert_column_current(stack, "embedding", "fake-768", 768)


@pytest.mark.second_server
def test_large_model_uses_halfvec(stack: Stack) -> None:
    require_server(stack.dsn, server_versions.HALFVEC)
    seed(stack, 12)
    running(stack)
    column = start_migration(stack, "--model", "fake-3072", "--dimensions", "3072")
    assert column_type(stack, column) == "halfvec(3072)"
    wait_filled(stack, column)
    migrate(stack, "index")
    migrate(stack, "swap")
    assert column_type(stack, "embedding") == "halfvec(3072)"
    assert_column_current(stack, "embedding", "fake-3072", 3072)


@pytest.mark.second_server
def test_cancel_leaves_the_table_exactly_as_before(stack: Stack) -> None:
    seed(stack, 10)
    running(stack)
    wait_filled(stack, "embedding")
    before = schema_snapshot(stack)
    migrate(stack, "start", "--model", "fake-768", "--dimensions", "768")
    assert schema_snapshot(stack) != before
    migrate(stack, "pause")
    assert json_document(migrate(stack, "status", "--json"))["paused"] is True
    # Cancel first clears the new column (killed here once that is done: the clearing's
    # own statements block none of the app's); then a long query holds the table: the
    # DROP COLUMN retries its short lock instead of queueing the app's queries behind an
    # unbounded wait, then drops the column.
    killed = subprocess.run([sys.executable, "-m", "pgreembed", "migrate", "cancel",
                             "--target", "docs"], env={**stack.env, CRASH_AT: "cancel_cleared"},
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    blocker = hold_table(stack, 3.0)  # many lock attempts (100 ms each) long
    out = stack.cli("migrate", "cancel", "--target", "docs", timeout=120)
    blocker.close()
    assert out.returncode == 0, out.stdout + out.stderr
    assert "cancel: table busy (" in out.stderr
    assert schema_snapshot(stack) == before
    with stack.connect() as conn:  # the trigger still works on the live column only
        conn.execute("UPDATE docs SET body = 'after cancel' WHERE id = 2")
    wait_filled(stack, "embedding")
    assert_column_current(stack, "embedding", "fake-384", 384)


@pytest.mark.second_server
def test_swap_under_concurrent_searches_and_writes(stack: Stack) -> None:
    seed(stack, 200)
    running(stack)
    wait_filled(stack, "embedding")
    new_column = start_migration(stack, "--model", "fake-768", "--dimensions", "768")
    wait_filled(stack, new_column)
    migrate(stack, "index")
    settings = parse_settings({"target": [{
        "name": "docs", "table": "public.docs", "text_columns": ["title", "body"],
        "vector_column": "embedding", "provider": "openai", "model": "fake-384",
        "dimensions": 384}]}, stack.env)
    errors: list[str] = []
    ran = {"search": 0, "write": 0}

    def searcher(stop: threading.Event) -> None:
        with psycopg.connect(stack.dsn, autocommit=True) as conn:
            from pgvector.psycopg import register_vector
            register_vector(conn)
            while not stop.is_set():
                try:
                    hits = search(conn, settings, "docs", "doc 5", limit=3)
                    assert hits
                    ran["search"] += 1
                except Exception as exc:  # noqa: BLE001 - every failure is counted
                    errors.append(f"search: {exc!r}")

    def writer(stop: threading.Event) -> None:
        with psycopg.connect(stack.dsn, autocommit=True) as conn:
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    conn.execute("UPDATE docs SET views = views + 1 WHERE id = %s",
                                 (i % 200 + 1,))
                    ran["write"] += 1
                except Exception as exc:  # noqa: BLE001
                    errors.append(f"write: {exc!r}")
                time.sleep(0.005)  # the app's pace

    def ran_since(before: dict[str, int]) -> bool:
        return all(ran[kind] > before[kind] + 10 for kind in ran)

    with in_background(searcher, searcher, searcher, writer):
        wait_for(lambda: ran_since({"search": 0, "write": 0}), timeout=60,
                 message=f"the app's searches and writes running ({ran})")
        out = migrate(stack, "swap")
        swapped = dict(ran)
        wait_for(lambda: ran_since(swapped), timeout=60,
                 message=f"the app's searches and writes after the swap ({ran})")
    assert "swap done" in out
    assert errors == [], errors[:5]


@pytest.mark.second_server
def test_index_retry_drops_invalid_leftover_and_swap_waits_for_lock(stack: Stack) -> None:
    # Two equal texts (row 1 and row 21): equal vectors, so a UNIQUE build fails.
    seed(stack, 20, rows=[("doc 1", "body 1")])
    running(stack)
    new_column = start_migration(stack, "--model", "fake-768", "--dimensions", "768")
    # Re-running start after a crash is harmless.
    migrate(stack, "start", "--model", "fake-768", "--dimensions", "768")
    wait_filled(stack, new_column)
    with stack.connect() as conn:
        slot_id = conn.execute("SELECT id FROM pgreembed.slots WHERE role = 'next'"
                               ).fetchone()[0]
        # A failed concurrent build leaves an INVALID index behind:
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute(f"CREATE UNIQUE INDEX CONCURRENTLY pgreembed_ann_{slot_id} ON docs"
                         f" ({new_column})")
    refused = stack.cli("migrate", "swap", "--target", "docs")
    assert refused.returncode == 4 and "INVALID" in refused.stderr
    migrate(stack, "index")
    # A long transaction holds the table: the swap retries until it is released.
    blocker = hold_table(stack, 3.0)  # many lock attempts (100 ms each) long
    started = time.monotonic()
    out = json.loads(migrate(stack, "swap", "--json"))
    blocker.close()
    assert out["step"] == "swap" and out["attempts"] >= 1
    assert time.monotonic() - started >= 2.5


def test_spend_cap_pauses_the_migration_and_status_reports_spend(stack: Stack) -> None:
    seed(stack, 80)
    running(stack)
    wait_filled(stack, "embedding")
    # $0.02 per 1M tokens; each row is ~15 tokens (bytes upper bound offline), so one
    # 8-row batch already costs more than this cap.
    migrate(stack, "start", "--model", "text-embedding-3-small", "--dimensions", "384",
            "--spend-cap", "0.000001")

    def paused() -> bool:
        return json_document(migrate(stack, "status", "--json"))["paused"] is True

    wait_for(paused, timeout=60, interval=0.5, message="the spend cap to pause the migration")
    status = json_document(migrate(stack, "status", "--json"))
    assert status["tokens"] > 0 and status["spend_usd"] >= 0.000001
    assert status["done"] < 80
    time.sleep(2)  # the scenario: a paused migration sends nothing more in this while
    assert json_document(migrate(stack, "status", "--json"))["tokens"] == status["tokens"]


def test_fill_resumes_after_worker_and_scheduler_are_killed(stack: Stack, fake_openai) -> None:
    import os
    import signal

    seed(stack, 120)
    running(stack)
    wait_filled(stack, "embedding")
    fake_openai.set_faults(latency=0.3)
    new_column = start_migration(stack, "--model", "fake-768", "--dimensions", "768")
    wait_for(lambda: fake_openai.stats()["inputs_embedded"] >= 8, timeout=30,
             message="the fill to begin")
    for process in stack.processes:  # SIGKILL the whole worker and scheduler groups
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
    with stack.connect() as conn:
        missing = conn.execute(f"SELECT count(*) FROM docs WHERE {new_column} IS NULL"
                               ).fetchone()[0]
        conn.execute("UPDATE docs SET body = 'edited while everything was down' WHERE id = 9")
    assert missing > 0, "the fill finished before the kill; the test proves nothing"
    fake_openai.set_faults(latency=0.0)
    stack.start_worker(threads=4)
    stack.start_scheduler()
    wait_filled(stack, new_column)
    wait_filled(stack, "embedding")
    assert_column_current(stack, new_column, "fake-768", 768)
    assert_column_current(stack, "embedding", "fake-384", 384)


@pytest.mark.second_server
def test_plan_changes_nothing_and_estimates_tokens_cost_time(database_url: str,
                                                             fake_openai) -> None:
    from pgreembed.migrations import plan as migration
    from pgreembed.store.setup import init_target

    require_server(database_url, server_versions.HALFVEC)  # plans a 3072-dim model
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
        conn.execute("INSERT INTO docs SELECT g, repeat('x', 40) FROM generate_series(1, 100) g")
        conn.execute("INSERT INTO docs VALUES (101, '  ')")
    document = {"target": [{
        "name": "docs", "table": "docs", "text_column": "body", "vector_column": "embedding",
        "provider": "openai", "model": "fake-384", "dimensions": 384,
        "tokens_per_minute": 1000, "batch_size": 10}]}
    env = {"DATABASE_URL": database_url, "OPENAI_BASE_URL": fake_openai.base_url}
    settings = parse_settings(document, env)
    target = settings.target("docs")
    init_target(database_url, target)
    with psycopg.connect(database_url) as conn:
        before = conn.execute("SELECT count(*) FROM pg_attribute WHERE attrelid ="
                              " 'docs'::regclass AND attnum > 0").fetchone()
    p = migration.plan(settings, target, "openai", "text-embedding-3-large", 3072)
    with psycopg.connect(database_url) as conn:
        after = conn.execute("SELECT count(*) FROM pg_attribute WHERE attrelid ="
                             " 'docs'::regclass AND attnum > 0").fetchone()
    assert before == after
    assert (p.rows, p.rows_without_text) == (101, 1)
    from pgreembed.embedding.providers import make_provider

    per_row = make_provider(settings, "openai", "text-embedding-3-large", 3072).count_tokens(
        ["x" * 40])[0]  # tiktoken when its encoding is cached, else the byte upper bound
    # 100 rows, one text: paid for once (dedupe, on by default).
    assert p.distinct_texts == 1
    assert p.tokens_exact and p.tokens == per_row
    assert any("99 rows repeat another row's text" in n for n in p.notes)
    assert p.cost_usd is not None and abs(p.cost_usd - p.tokens / 1e6 * 0.13) < 1e-9
    # The target's budget is fake-384's, not the new model's: no estimate from it...
    assert p.minutes_at_rate_limit is None
    # ...the new model's budgets are: what start would record, and the config's.
    from pgreembed.config import Budget

    with_budget = migration.plan(settings, target, "openai", "text-embedding-3-large", 3072,
                                 budget=Budget(tokens_per_minute=2000))
    assert with_budget.minutes_at_rate_limit == p.tokens / 2000
    limited = parse_settings({**document, "rate_limits": {
        "text-embedding-3-large": {"tokens_per_minute": 500, "requests_per_minute": 1}}}, env)
    tighter = migration.plan(limited, target, "openai", "text-embedding-3-large", 3072,
                             budget=Budget(tokens_per_minute=2000))
    assert tighter.budget == Budget(1, 500)
    assert tighter.minutes_at_rate_limit == max(p.tokens / 500, 10 / 1)  # 10 batches of 10
    assert p.column_type == "halfvec(3072)" and any("halfvec" in n for n in p.notes)
    # A row without text holds no vector in either column: a note, not a blocker.
    assert [c for n in p.notes for c in counts(r"^~?(\d+) rows have no text", n)] == [(1,)]
    assert not p.blockers
    assert p.storage_bytes == 101 * (2 * 3072 + 8)


def test_swap_and_rollback_killed_mid_way_change_nothing_and_can_be_rerun(stack: Stack
                                                                          ) -> None:
    """SIGKILL of `migrate swap`/`rollback` while it retries on a busy table: no half swap."""
    seed(stack, 20)
    running(stack)
    new_column = start_migration(stack, "--model", "fake-768", "--dimensions", "768")
    wait_filled(stack, new_column)
    migrate(stack, "index")

    def killed_while_table_is_busy(step: str) -> None:
        blocker = hold_table(stack)
        before = schema_snapshot(stack)
        process = stack.spawn(step, [sys.executable, "-m", "pgreembed", "migrate", step,
                                     "--target", "docs"])
        log = stack.logs / f"{step}.log"
        wait_for(lambda: "table busy" in log.read_text(errors="replace"),
                 timeout=60, message=f"`migrate {step}` to be retrying")
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
        blocker.close()
        assert schema_snapshot(stack) == before, f"a killed {step} changed the schema"

    killed_while_table_is_busy("swap")
    assert column_type(stack, "embedding") == "vector(384)"
    with stack.connect() as conn:
        assert conn.execute("SELECT model FROM pgreembed.active_models").fetchone() == (
            "fake-384",)
    assert "swap done" in migrate(stack, "swap")
    swapped = stack.cli("status").stdout
    assert status_roles(swapped) == {"embedding": "live", new_column: "old"}
    [line] = [line for line in swapped.splitlines() if line.startswith("migration of docs:")]
    assert line.startswith(f"migration of docs: swapped; {new_column} (openai:fake-384@384)"
                           " kept current") and "[#" not in line, line
    assert column_type(stack, "embedding") == "vector(768)"

    with stack.connect() as conn:
        conn.execute("UPDATE docs SET body = 'after the swap' WHERE id = 4")
    killed_while_table_is_busy("rollback")
    assert column_type(stack, "embedding") == "vector(768)"
    assert "rollback done" in migrate(stack, "rollback")
    assert column_type(stack, "embedding") == "vector(384)"
    # Row 4, edited after the swap, is embedded again in each column, by batches of their
    # own: filled in one column says nothing of the other.
    wait_filled(stack, "embedding")
    wait_filled(stack, new_column)
    assert_column_current(stack, "embedding", "fake-384", 384)
    assert_column_current(stack, new_column, "fake-768", 768)


def test_new_index_serves_the_live_index_distance_or_swap_refuses(stack: Stack) -> None:
    """An app querying with <-> (L2) must keep an index it can use after the swap."""
    seed(stack, 20)
    running(stack, index="ivfflat (embedding vector_l2_ops) WITH (lists = 1)")
    new_column = start_migration(stack, "--model", "fake-768", "--dimensions", "768")
    wait_filled(stack, new_column)

    def new_index() -> str:
        """'<method> <opclass>' of our index on the new column."""
        with stack.connect() as conn:
            return " ".join(conn.execute(
                "SELECT am.amname, o.opcname FROM pg_index i"
                " JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am am ON am.oid = c.relam"
                " JOIN pg_opclass o ON o.oid = i.indclass[0]"
                " WHERE c.relname LIKE 'pgreembed_ann_%'").fetchone())

    # A migration is open, so plan reports that blocker (exit 4) and still prints its SQL.
    planned = stack.cli("migrate", "plan", "--target", "docs", "--model", "fake-768",
                        "--dimensions", "768")
    assert planned.returncode == 4 and "BLOCKER: migration" in planned.stdout
    plan = planned.stdout
    assert f'USING "ivfflat" ("{new_column}" "vector_l2_ops")' in plan, plan
    migrate(stack, "index", "--distance", "cosine")  # what the live index does not serve
    assert new_index() == "ivfflat vector_cosine_ops"  # the method still follows the live one
    refused = stack.cli("migrate", "swap", "--target", "docs")
    assert refused.returncode == 4
    assert "indexed for l2 distance" in refused.stderr, refused.stderr
    migrate(stack, "index")  # defaults to the live index: rebuilt as ivfflat + l2
    assert new_index() == "ivfflat vector_l2_ops"
    assert "swap done" in migrate(stack, "swap")
    with stack.connect() as conn:
        conn.execute("SET enable_seqscan = off")  # 20 rows: only asks whether it *can*
        plan = "\n".join(r[0] for r in conn.execute(
            "EXPLAIN (COSTS OFF) SELECT id FROM docs ORDER BY embedding <-> %s::vector LIMIT 5",
            (str([0.0] * 767 + [1.0]),)).fetchall())
    assert "Index Scan using docs_embedding_idx" in plan, plan[:300]
