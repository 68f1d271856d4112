"""Big backlogs of an HNSW-indexed live column go side by side; small inflows stay direct.

Real Postgres + pgvector, Redis, workers, scheduler and the OpenAI-compatible server; a
writer keeps editing and inserting rows, the provider is slowed, and at the end every
row's vector is compared with its model's vector for the row's current text.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import psycopg
import pytest
from psycopg import sql

from pgreembed.config import parse_settings
from pgreembed.errors import ConfigError
from pgreembed.testing.fake_openai import FakeOpenAIServer
from pgreembed.testing.fake_vectors import fake_vector
from tests.app_side import app_transactions, assert_app_reads_live, repeatable_read_by_default
from tests.helpers import (
    OrdinaryRoles,
    Stack,
    assert_column_current,
    column_type,
    docs_config,
    migrate,
    migrations,
    new_column,
    seed,
    side_fill_section,
    steady_writer,
    vector_columns,
    wait_filled,
    wait_for,
    write_config,
)

OLD, NEW = "fake-384", "fake-alt-384"
SIDE_FILL = side_fill_section(grace_seconds=2)


def ann_index(stack: Stack) -> tuple[int, str, bool]:
    """(oid, name, valid) of the HNSW index on the live column `embedding`."""
    with stack.connect() as conn:
        row = conn.execute(
            "SELECT c.oid::int, c.relname, i.indisvalid FROM pg_index i"
            " JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am am ON am.oid = c.relam"
            " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)"
            " WHERE i.indrelid = 'docs'::regclass AND am.amname = 'hnsw'"
            " AND a.attname = 'embedding'").fetchone()
    assert row is not None, "no HNSW index on embedding"
    return int(row[0]), str(row[1]), bool(row[2])


def live_vectors_of(stack: Stack, model: str) -> str:
    """The side fill's phase and, in the same snapshot, a check that every vector in the
    live column is `model`'s for the row's current text (rows without one aside)."""
    with psycopg.connect(stack.dsn) as conn:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        phase = conn.execute("SELECT phase FROM pgreembed.migrations ORDER BY id DESC"
                             " LIMIT 1").fetchone()
        rows = conn.execute("SELECT id, concat_ws(E'\\n', title, body), embedding::text"
                            " FROM docs WHERE embedding IS NOT NULL").fetchall()
    for key, text, vector in rows:
        got = np.array([float(x) for x in vector.strip("[]").split(",")], dtype=np.float32)
        np.testing.assert_allclose(got, fake_vector(model, text, 384), atol=2e-3,
                                   err_msg=f"row {key}: embedding is not {model}({text!r})")
    assert phase is not None
    return str(phase[0])


def status_paths(stack: Stack) -> dict[str, object]:
    result = stack.cli("status", "--json")
    assert result.returncode == 0, result.stderr
    live = next(r for r in json.loads(result.stdout)["columns"] if r["role"] == "live")
    return {"path": live["path"], "side_fill": live["side_fill"]}


def finished(stack: Stack) -> None:
    wait_for(lambda: migrations(stack) and migrations(stack)[-1][1] == "finalized",
             timeout=180, interval=0.5, message="the side fill finalized")


def filled_and_indexed(stack: Stack, rows: int, side_fill: str = SIDE_FILL) -> None:
    """`rows` rows embedded by running processes, then the app's HNSW index, as users have it."""
    write_config(stack.config_path, docs_config(batch_size=16, max_inflight_rows=128,
                                                worker_extra=side_fill))
    seed(stack, rows)
    assert stack.cli("init").returncode == 0
    stack.start_worker(threads=4)
    stack.start_scheduler()
    wait_filled(stack, "embedding")
    with stack.connect() as conn:
        conn.execute("CREATE INDEX docs_embedding_idx ON docs USING hnsw"
                     " (embedding vector_cosine_ops)")


def test_big_backlog_goes_side_by_side_small_inflow_stays_direct(
        stack: Stack, fake_openai: FakeOpenAIServer) -> None:
    filled_and_indexed(stack, 60)
    app_index = ann_index(stack)

    with steady_writer(stack, per_second=5.0, edits=range(1, 61)) as small:
        seed(stack, 20)  # below the threshold (max(50, 30% of 80))
        wait_filled(stack, "embedding")
    assert migrations(stack) == []
    assert status_paths(stack) == {"path": "direct", "side_fill": None}
    assert small["edits"] > 0 and small["errors"] == 0

    fake_openai.set_faults(slow_model=OLD, slow_model_latency=1.0)
    with steady_writer(stack, per_second=10.0, edits=range(1, 61)) as big:
        seed(stack, 400)  # a bulk import: far above the threshold
        wait_for(lambda: migrations(stack), timeout=30, message="a side fill started")
        assert migrations(stack)[0][0] == "backlog"
        side = status_paths(stack)
        assert side["path"] == "side"
        assert isinstance(side["side_fill"], dict)
        column = side["side_fill"]["column"]
        assert column != "embedding" and column in vector_columns(stack)
        fake_openai.set_faults(slow_model=OLD, slow_model_latency=0.2)
        wait_for(lambda: migrations(stack)[0][1] == "swapped", timeout=180, interval=0.3,
                 message="the side column swapped in")
    fake_openai.set_faults(slow_model=None, slow_model_latency=0.0)
    finished(stack)
    wait_filled(stack, "embedding")
    assert big["edits"] > 20 and big["errors"] == 0

    oid, name, valid = ann_index(stack)
    assert valid and name == "docs_embedding_idx"  # the app's index name, on the new column
    assert oid != app_index[0]  # built concurrently on the side column, then swapped in
    assert vector_columns(stack) == {"embedding"}  # the previous column is dropped
    assert [m[:2] for m in migrations(stack)] == [("backlog", "finalized")]
    log = stack.log_text()
    assert f"CREATE INDEX CONCURRENTLY on {column}" in log
    assert "vectors copied into" in log
    assert status_paths(stack) == {"path": "direct", "side_fill": None}
    assert_column_current(stack, "embedding", OLD, 384)


@pytest.mark.second_server
def test_init_after_a_model_change_fills_a_side_column(
        stack: Stack, fake_openai: FakeOpenAIServer) -> None:
    filled_and_indexed(stack, 120)
    fake_openai.set_faults(slow_model=NEW, slow_model_latency=2.0)
    write_config(stack.config_path, docs_config(
        batch_size=16, max_inflight_rows=128, worker_extra=SIDE_FILL).replace(
            f'model = "{OLD}"', f'model = "{NEW}"'))
    with steady_writer(stack, per_second=10.0, edits=range(1, 61)) as writes:
        result = stack.cli("init")
        assert result.returncode == 0, result.stderr
        assert "re-embedded into the side column" in result.stdout
        assert migrations(stack)[0][0] == "model_change"
        # Until the swap, search uses the old model only: the live column is not rewritten.
        for _ in range(5):
            assert live_vectors_of(stack, OLD) == "filling"
        assert status_paths(stack)["path"] == "side"
        fake_openai.set_faults(slow_model=NEW, slow_model_latency=0.1)
        wait_for(lambda: migrations(stack)[0][1] != "filling", timeout=180, interval=0.3,
                 message="the side column swapped in")
    fake_openai.set_faults(slow_model=None, slow_model_latency=0.0)
    finished(stack)
    wait_filled(stack, "embedding")
    assert writes["errors"] == 0
    assert vector_columns(stack) == {"embedding"}
    assert ann_index(stack)[1:] == ("docs_embedding_idx", True)
    assert_column_current(stack, "embedding", NEW, 384)


@pytest.mark.second_server
def test_a_cron_tick_takes_the_side_fill_through_to_the_swap(
        stack: Stack, fake_openai: FakeOpenAIServer) -> None:
    """Without a scheduler process, `tick --wait` starts, fills, indexes and swaps; the next
    tick after the grace period drops the previous column."""
    write_config(stack.config_path, docs_config(batch_size=16, max_inflight_rows=128,
                                                worker_extra=SIDE_FILL))
    seed(stack, 60)
    assert stack.cli("init").returncode == 0
    stack.start_worker(threads=4)
    assert stack.cli("tick", "--wait", "--timeout", "60").returncode == 0
    with stack.connect() as conn:
        conn.execute("CREATE INDEX docs_embedding_idx ON docs USING hnsw"
                     " (embedding vector_cosine_ops)")
    seed(stack, 300)
    result = stack.cli("tick", "--wait", "--timeout", "120", timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert [m[:2] for m in migrations(stack)] == [("backlog", "swapped")]
    wait_for(lambda: stack.cli("tick").returncode == 0 and migrations(stack)[0][1] == "finalized",
             timeout=30, interval=1.0, message="finalized after the grace period")
    assert vector_columns(stack) == {"embedding"}
    assert ann_index(stack)[1:] == ("docs_embedding_idx", True)
    assert_column_current(stack, "embedding", OLD, 384)


TARGET = {"name": "docs", "table": "docs", "text_column": "body", "provider": "local",
          "vector_column": "embedding", "model": "all-MiniLM-L6-v2-onnx-int8",
          "dimensions": 384}


@pytest.mark.second_server
def test_side_fill_settings_default_and_errors_name_the_field() -> None:
    env = {"DATABASE_URL": "postgresql://localhost/db"}
    defaults = parse_settings({"target": [TARGET]}, env).side_fill
    assert (defaults.min_rows, defaults.min_share, defaults.enabled) == (1000, 0.4, True)
    assert defaults.threshold(100) == 1000 and defaults.threshold(1_000_000) == 400_000
    tuned = parse_settings({"target": [TARGET], "side_fill": {
        "min_rows": 10, "min_share": 0.5, "parallel_workers": 0}}, env).side_fill
    assert (tuned.threshold(100), tuned.parallel_workers) == (50, 0)
    for section, message in (({"min_rows": "many"}, "side_fill.min_rows: must be an integer >= 1"),
                             ({"min_share": -1}, "side_fill.min_share: must be a number >= 0"),
                             ({"enabled": "yes"}, "side_fill.enabled: must be true or false"),
                             ({"min_row": 5}, "min_rows")):
        with pytest.raises(ConfigError, match=message):
            parse_settings({"target": [TARGET], "side_fill": section}, env)


def test_a_side_fill_whose_swap_would_be_refused_does_not_start_or_is_cancelled(
        stack: Stack, fake_openai: FakeOpenAIServer) -> None:
    """A materialized view over the live column: the side fill's swap would always be
    refused, and a side fill pauses the live column until its swap. So the backlog is
    filled directly (told once), a side fill that meets such an object later is cancelled
    (the live column fills again), and `init` keeps a model change in place."""
    filled_and_indexed(stack, 60)
    snapshot = "CREATE MATERIALIZED VIEW docs_snapshot AS SELECT id, embedding FROM docs"
    with stack.connect() as conn:
        conn.execute(snapshot)
    told = "filled directly: a side fill's swap would be refused"
    fake_openai.set_faults(slow_model=OLD, slow_model_latency=1.0)  # the scheduler sees it
    seed(stack, 300, title="import", body="first import ")  # texts not seen before
    wait_for(lambda: told in stack.log_text(), timeout=30, message="the refusal logged")
    fake_openai.set_faults(slow_model=None, slow_model_latency=0.0)
    wait_filled(stack, "embedding")
    assert migrations(stack) == []
    assert stack.log_text().count(told) == 1
    assert "public.docs_snapshot" in stack.log_text()

    with stack.connect() as conn:
        conn.execute("DROP MATERIALIZED VIEW docs_snapshot")
    fake_openai.set_faults(slow_model=OLD, slow_model_latency=2.0)
    # A side fill starts, then the app adds its snapshot.
    seed(stack, 500, title="bulk", body="second import ")
    wait_for(lambda: migrations(stack), timeout=30, message="a side fill started")
    with stack.connect() as conn:
        conn.execute(snapshot)
    fake_openai.set_faults(slow_model=None, slow_model_latency=0.0)
    wait_for(lambda: migrations(stack)[0][1] == "cancelled", timeout=120, interval=0.3,
             message="the side fill cancelled at its swap")
    assert stack.log_text().count("cancelled, the live column embedding is filled directly") == 1
    # The live column is not paused: new rows become searchable.
    seed(stack, 300, title="late", body="after the cancel ")
    wait_filled(stack, "embedding")
    assert [m[:2] for m in migrations(stack)] == [("backlog", "cancelled")]
    assert vector_columns(stack) == {"embedding"}
    assert_column_current(stack, "embedding", OLD, 384)

    write_config(stack.config_path, docs_config(
        batch_size=16, max_inflight_rows=128, worker_extra=SIDE_FILL).replace(
            f'model = "{OLD}"', f'model = "{NEW}"'))
    result = stack.cli("init")
    assert result.returncode == 0, result.stderr
    assert "side column" not in result.stdout
    assert "public.docs_snapshot" in result.stderr
    assert [m[:2] for m in migrations(stack)] == [("backlog", "cancelled")]


HALFVEC_APP_OBJECTS = """
CREATE VIEW docs_search AS SELECT id, title, body, embedding FROM docs;
CREATE FUNCTION doc_embedding(doc bigint) RETURNS halfvec LANGUAGE sql STABLE
BEGIN ATOMIC SELECT embedding FROM docs_search WHERE id = doc; END;
CREATE FUNCTION nearest_docs(q halfvec) RETURNS SETOF bigint LANGUAGE sql STABLE
BEGIN ATOMIC SELECT id FROM docs_search ORDER BY embedding <=> q LIMIT 5; END;
"""


@pytest.mark.timeout(420)
def test_a_model_change_at_init_keeps_a_halfvec_live_column_halfvec(
        ordinary_roles: tuple[Stack, OrdinaryRoles], fake_openai: FakeOpenAIServer) -> None:
    """The config says vector_type = "halfvec" (as after a `--derive halfvec` migration)
    and the app's function returns the column's halfvec: the side fill `init` starts for
    a model change fills a halfvec column, so its swap goes through. (It filled a vector
    column, its swap was refused, it was cancelled after buying every vector, and the
    next `init` started it again.) The user's database: ordinary roles, REPEATABLE READ
    by default, the app's view and functions, app transactions holding rows, a steady
    writer and a slowed provider."""
    stack, roles = ordinary_roles
    repeatable_read_by_default(stack)
    config = docs_config(batch_size=16, max_inflight_rows=128, worker_extra=SIDE_FILL,
                         target_extra='vector_type = "halfvec"')
    write_config(stack.config_path, config)
    seed(stack, 120)
    assert stack.cli("init").returncode == 0
    assert column_type(stack, "embedding") == "halfvec(384)"
    with stack.connect() as conn:
        conn.execute(HALFVEC_APP_OBJECTS)
        for name in ("VIEW docs_search", "FUNCTION doc_embedding(bigint)",
                     "FUNCTION nearest_docs(halfvec)"):
            conn.execute(sql.SQL(f"ALTER {name} OWNER TO {{}}").format(
                sql.Identifier(roles.owner)))
        conn.execute(sql.SQL("GRANT SELECT ON docs_search TO {}").format(
            sql.Identifier(roles.app)))
    stack.start_worker(threads=4)
    stack.start_scheduler()
    wait_filled(stack, "embedding")
    with stack.connect() as conn:  # after the first fill, as filled_and_indexed
        conn.execute("CREATE INDEX docs_embedding_idx ON docs USING hnsw"
                     " (embedding halfvec_cosine_ops)")
    assert migrations(stack) == []

    app = dataclasses.replace(stack, dsn=roles.app_dsn)
    fake_openai.set_faults(slow_model=NEW, slow_model_latency=1.0)
    write_config(stack.config_path, config.replace(f'model = "{OLD}"', f'model = "{NEW}"'))
    with steady_writer(app, per_second=5.0, edits=range(1, 61)) as writes, \
            app_transactions(roles.app_dsn, range(61, 101)) as transactions:
        result = stack.cli("init")
        assert result.returncode == 0, result.stderr
        assert "re-embedded into the side column" in result.stdout
        assert column_type(stack, new_column(stack)) == "halfvec(384)"
        fake_openai.set_faults(slow_model=NEW, slow_model_latency=0.1)
        wait_for(lambda: migrations(stack)[0][1] != "filling", timeout=240, interval=0.3,
                 message="the side column swapped in")
        assert migrations(stack)[0][:2] == ("model_change", "swapped"), migrations(stack)
    fake_openai.set_faults(slow_model=None, slow_model_latency=0.0)
    finished(stack)
    wait_filled(stack, "embedding")
    assert writes["errors"] == 0 and writes["edits"] > 10
    assert transactions.errors == [] and transactions.done > 10
    assert column_type(stack, "embedding") == "halfvec(384)"
    assert_column_current(stack, "embedding", NEW, 384)
    assert_app_reads_live(roles)
    with psycopg.connect(roles.app_dsn) as conn:
        near = conn.execute("SELECT nearest_docs(embedding) FROM docs WHERE id = 7").fetchall()
    assert (7,) in near  # the function searches the new column through the app's view


@pytest.mark.timeout(300)
def test_init_does_not_start_again_a_model_change_fill_cancelled_at_its_swap(
        stack: Stack, fake_openai: FakeOpenAIServer) -> None:
    """Each start buys the whole table's vectors: a model change's side fill cancelled at
    its swap is not started again by the next `init` (systemd's ExecStartPre, the k8s init
    Job run it on every deploy); the warning names the command that starts it."""
    filled_and_indexed(stack, 120)
    fake_openai.set_faults(slow_model=NEW, slow_model_latency=2.0)
    write_config(stack.config_path, docs_config(
        batch_size=16, max_inflight_rows=128, worker_extra=SIDE_FILL).replace(
            f'model = "{OLD}"', f'model = "{NEW}"'))
    assert "re-embedded into the side column" in stack.cli("init").stdout
    with stack.connect() as conn:  # the app adds an object its swap would have to refuse
        conn.execute("CREATE MATERIALIZED VIEW docs_snapshot AS SELECT id, embedding FROM docs")
    fake_openai.set_faults(slow_model=None, slow_model_latency=0.0)
    wait_for(lambda: migrations(stack)[0][1] == "cancelled", timeout=120, interval=0.3,
             message="the side fill cancelled at its swap")
    with stack.connect() as conn:
        conn.execute("DROP MATERIALIZED VIEW docs_snapshot")

    again = stack.cli("init")
    assert again.returncode == 0, again.stderr
    assert "side column" not in again.stdout
    assert "was cancelled (by pgreembed at its swap" in again.stderr
    assert [m[:2] for m in migrations(stack)] == [("model_change", "cancelled")]
    told = again.stderr.split("then `", 1)[1].split("`", 1)[0].split()
    assert told[:3] == ["pgreembed", "migrate", "start"]
    migrate(stack, "start", *[a for a in told[3:] if a not in ("--target", "docs")])
    assert [m[:2] for m in migrations(stack)] == [("model_change", "cancelled"),
                                                  (None, "filling")]


def test_a_backlog_side_fill_offers_no_rollback_to_its_paused_column(
        stack: Stack, fake_openai: FakeOpenAIServer) -> None:
    """A backlog side fill swaps in a column of the same model; the previous one stayed
    paused (the backlog was not written through its index), so it lacks the backlog's
    vectors. `status` says so, and `migrate rollback` refuses at once (exit 4) naming why
    (it waited its whole --timeout for vectors nothing writes, then blamed the workers)."""
    filled_and_indexed(stack, 60, side_fill_section(grace_seconds=600))
    seed(stack, 400)  # a bulk import: a side fill
    wait_for(lambda: migrations(stack) and migrations(stack)[0][1] == "swapped", timeout=180,
             interval=0.3, message="the backlog's side column swapped in")
    status = stack.cli("status")
    assert status.returncode == 0, status.stderr
    assert "paused, not kept current" in status.stdout, status.stdout
    assert "`migrate rollback` makes it live again" not in status.stdout

    refused = stack.cli("migrate", "rollback", "--target", "docs", "--timeout", "20",
                        "--json")
    assert refused.returncode == 4, refused.stdout + refused.stderr
    message = json.loads(refused.stdout)["error"]["message"]
    assert "no other model to roll back to" in message and "backlog" in message, message
    assert migrations(stack)[0][:2] == ("backlog", "swapped")
    wait_filled(stack, "embedding")
    assert_column_current(stack, "embedding", OLD, 384)
