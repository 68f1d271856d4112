"""Issue 25: `status`, the metrics and `doctor` count parents and chunks of a chunked
target: parents, parents to chunk (and the oldest mark's age), gone marks still to sweep,
chunks, chunks without a vector; doctor flags a stalled chunk stage and orphan chunks."""

from __future__ import annotations

from typing import Any

import psycopg

from pgreembed.chunking.stage import run_chunk_stage
from pgreembed.config import load_settings
from pgreembed.observability.scheduler_metrics import DatabaseCollector
from pgreembed.operations.chunk_status import chunking_status
from pgreembed.operations.doctor.checks import run_doctor
from tests.helpers import Stack, json_document
from tests.test_chunked_targets import chunked_stack, drain, init


def chunking(stack: Stack, cli: bool = False) -> dict[str, Any]:
    """`status --json`'s chunking entry (`cli`: through the command and its schema)."""
    if cli:
        out = stack.cli("status", "--json")
        assert out.returncode == 0, out.stderr
        [found] = json_document(out.stdout)["chunking"]
        return found  # type: ignore[no-any-return]
    with stack.connect() as conn:
        [status] = chunking_status(conn, load_settings(stack.config_path, stack.env))
    return status.as_dict()


def gauges(stack: Stack) -> dict[tuple[str, ...], float]:
    families = {m.name: m for m in DatabaseCollector(
        load_settings(stack.config_path, stack.env)).collect()}
    found = {(s.labels["target"], s.labels["state"]): s.value
             for s in families["pgreembed_chunking"].samples}
    for s in families["pgreembed_chunking_oldest_mark_seconds"].samples:
        found[(s.labels["target"], "oldest_mark_seconds")] = s.value
    return found


def doctor(stack: Stack, cli: bool = False) -> dict[str, dict[str, Any]]:
    if cli:
        out = stack.cli("doctor", "--json")
        findings = json_document(out.stdout)["findings"]
    else:
        findings = [f.as_dict() for f in run_doctor(
            load_settings(stack.config_path, stack.env), targets=["docs"])]
    return {f["check"]: f for f in findings
            if f["target"] == "docs" and f["check"].startswith("chunk_")}


def test_status_metrics_and_doctor_count_parents_and_chunks(stack: Stack) -> None:
    chunked_stack(stack)
    target = init(stack)
    with stack.connect() as conn:
        conn.execute("INSERT INTO docs (title, body) SELECT 't', 'b' || i FROM"
                     " generate_series(1, 7) i")
        conn.execute("UPDATE pgreembed.chunk_dirty_docs SET pgr_marked_at = now()"
                     " - interval '1 hour' WHERE pgr_pk = 3")
    before = chunking(stack, cli=True)
    assert {k: before[k] for k in ("parents", "parents_to_chunk", "gone_marks", "chunks",
                                   "chunks_pending", "parents_estimated")} == {
        "parents": 7, "parents_to_chunk": 7, "gone_marks": 0, "chunks": 0,
        "chunks_pending": 0, "parents_estimated": False}
    assert 3500 < before["oldest_mark_seconds"] < 4000
    assert gauges(stack)[("docs", "parents_to_chunk")] == 7
    assert gauges(stack)[("docs", "oldest_mark_seconds")] > 3500
    found = doctor(stack, cli=True)
    assert found["chunk_backlog"]["level"] == "warn", found  # the stage is not running
    assert found["chunk_backlog"]["details"]["parents_to_chunk"] == 7

    drain(stack.dsn, target)
    after = chunking(stack)
    assert (after["parents"], after["parents_to_chunk"], after["oldest_mark_seconds"],
            after["chunks"], after["chunks_pending"]) == (7, 0, None, 7, 7)
    assert gauges(stack)[("docs", "chunks_pending")] == 7
    assert gauges(stack)[("docs", "oldest_mark_seconds")] == 0
    found = doctor(stack)
    assert [f["level"] for f in found.values()] == ["ok", "ok"], found

    # A REPEATABLE READ delete that cannot see the chunks leaves a gone mark: counted,
    # and its chunks are orphans doctor explains by it.
    with stack.connect() as conn:
        conn.execute("UPDATE docs SET body = 'new' WHERE id = 1")
    with psycopg.connect(stack.dsn) as app:
        app.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        app.execute("SELECT count(*) FROM docs")  # the snapshot is taken here
        drain(stack.dsn, target)
        app.execute("DELETE FROM docs WHERE id = 1")
        app.commit()
    marked = chunking(stack)
    assert (marked["parents"], marked["gone_marks"]) == (6, 1), marked
    assert gauges(stack)[("docs", "gone_marks")] == 1
    found = doctor(stack)
    assert found["chunk_orphans"]["level"] == "ok"
    assert found["chunk_orphans"]["details"] == {"orphans": 1, "gone_marks": 1}
    with stack.connect() as conn:
        run_chunk_stage(conn, load_settings(stack.config_path, stack.env))
    assert chunking(stack)["gone_marks"] == 0

    # Parents deleted while the triggers were off: orphans doctor warns of, with the SQL.
    with stack.connect() as conn:
        conn.execute("ALTER TABLE docs DISABLE TRIGGER USER")
        conn.execute("DELETE FROM docs WHERE id IN (2, 3)")
        conn.execute("ALTER TABLE docs ENABLE TRIGGER USER")
    found = doctor(stack)["chunk_orphans"]
    assert found["level"] == "warn" and found["details"]["orphans"] == 2, found
    with stack.connect() as conn:
        conn.execute(found["details"]["sql"])
    assert doctor(stack)["chunk_orphans"]["level"] == "ok"
    assert chunking(stack)["chunks"] == 4
