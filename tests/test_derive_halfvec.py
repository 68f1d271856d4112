"""`migrate --derive halfvec` (issue 16.1): the live vectors cast to halfvec in SQL, no
provider call, through start / index / swap / rollback / swap while the app writes."""

from __future__ import annotations

import json

import psycopg
import pytest

from pgreembed.store import server_versions
from pgreembed.testing.fake_openai import FakeOpenAIServer
from tests.helpers import (
    Stack,
    assert_column_current,
    column_type,
    docs_config,
    migrate,
    new_column,
    require_server,
    running,
    seed,
    steady_writer,
    wait_filled,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.second_server  # also run on PostgreSQL 15 by .ci/run

ROWS = 400
STALE = range(1, 11)  # rows whose live vector is of an older text (edited, trigger off)


def ann_opclasses(stack: Stack, column: str) -> list[str]:
    with stack.connect() as conn:
        return [r[0] for r in conn.execute(
            "SELECT o.opcname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid"
            " AND a.attnum = i.indkey[0] JOIN pg_opclass o ON o.oid = i.indclass[0]"
            " WHERE i.indrelid = 'docs'::regclass AND a.attname = %s"
            " AND o.opcname LIKE '%%cosine%%'", (column,)).fetchall()]


@pytest.mark.timeout(600)  # 225 s on the loaded 2-core machine: a whole migration, twice swapped
def test_halfvec_migration_swaps_and_rolls_back_under_concurrent_writes(
        stack: Stack, fake_openai: FakeOpenAIServer) -> None:
    require_server(stack.dsn, server_versions.HALFVEC)
    seed(stack, ROWS)
    running(stack)
    wait_filled(stack, "embedding")
    # Rows edited with the triggers off: their live vector is the model's vector of their
    # previous text, and the state table says so (its hash). The fill must not cast them.
    with psycopg.connect(stack.dsn, autocommit=True) as conn:
        conn.execute("SET session_replication_role = replica")
        conn.execute("UPDATE docs SET body = 'stale ' || id WHERE id = ANY(%s)",
                     (list(STALE),))

    plan = stack.cli("migrate", "plan", "--target", "docs", "--derive", "halfvec", "--json")
    assert plan.returncode == 0, plan.stderr
    planned = json.loads(plan.stdout)
    assert (planned["cost_usd"], planned["provider_inputs"]) == (0.0, 0)
    assert planned["column_type"] == "halfvec(384)"
    assert planned["storage_saved_bytes"] == ROWS * 384 * 2
    assert planned["index_saved_bytes_estimate"] > 0

    with steady_writer(stack, per_second=10.0, edits=range(20, ROWS + 1)) as writes:
        fake_openai.reset()
        fake_openai.set_faults(slow_model="fake-384", slow_model_latency=0.3)
        migrate(stack, "start", "--derive", "halfvec")
        sent = fake_openai.stats()["text_counts"]
        incoming = new_column(stack)
        assert column_type(stack, incoming) == "halfvec(384)"
        # The fill itself sent nothing: whatever reached the provider meanwhile is a text
        # the writer wrote (or a stale row's, left to the provider), never a seeded one.
        assert not [t for t in sent if "\nbody " in t], sorted(sent)[:5]
        with stack.connect() as conn:
            assert conn.execute(
                "SELECT s.vector_type, g.derived FROM pgreembed.migrations g"
                " JOIN pgreembed.slots s ON s.id = g.to_slot").fetchone() == (
                "halfvec", "halfvec of openai:fake-384@384")
            # The operator's repair of the stale live vectors: clear them, they re-embed.
            conn.execute("UPDATE docs SET embedding = NULL WHERE id = ANY(%s)", (list(STALE),))
        migrate(stack, "index")
        assert ann_opclasses(stack, incoming) == ["halfvec_cosine_ops"]
        migrate(stack, "swap", "--max-unsearchable", "1000")
        assert column_type(stack, "embedding") == "halfvec(384)"
        assert ann_opclasses(stack, "embedding") == ["halfvec_cosine_ops"]
        migrate(stack, "rollback")
        assert column_type(stack, "embedding") == "vector(384)"
        migrate(stack, "swap", "--max-unsearchable", "1000")
        assert column_type(stack, "embedding") == "halfvec(384)"
        # The app keeps writing after the swap back (the lifecycle can take ~2 s here).
        wait_for(lambda: writes["inserts"] > 20, timeout=30, message="the app's writes")
    assert writes["errors"] == 0
    fake_openai.set_faults(slow_model=None, slow_model_latency=0.0)
    wait_filled(stack, "embedding")
    wait_filled(stack, incoming)
    # Every row, both columns: the model's vector of the row's current text (halfvec
    # rounds each component to ~1e-4 here, within the helper's 2e-3).
    assert_column_current(stack, "embedding", "fake-384", 384)
    assert_column_current(stack, incoming, "fake-384", 384)

    # The app's query with a `vector` parameter still works on the halfvec column.
    with stack.connect() as conn:
        probe = conn.execute(f"SELECT {incoming}::text FROM docs WHERE id = 50").fetchone()
        nearest = conn.execute("SELECT id FROM docs ORDER BY embedding <=> %s::vector"
                               " LIMIT 1", (probe[0],)).fetchone()
        assert nearest == (50,)

    # The config that says so: init and doctor agree with the registry.
    write_config(stack.config_path, docs_config(target_extra='vector_type = "halfvec"'))
    assert stack.cli("init").returncode == 0
    doctor = stack.cli("doctor", "--json", "--target", "docs")
    findings = json.loads(doctor.stdout)["findings"]
    column = [f for f in findings if f["check"] == "vector_column"]
    assert column and column[0]["level"] == "ok", column


def test_halfvec_is_refused_when_the_live_column_is_halfvec(stack: Stack) -> None:
    require_server(stack.dsn, server_versions.HALFVEC)
    write_config(stack.config_path, docs_config(target_extra='vector_type = "halfvec"'))
    seed(stack, 3)
    assert stack.cli("init").returncode == 0
    assert column_type(stack, "embedding") == "halfvec(384)"
    result = stack.cli("migrate", "start", "--target", "docs", "--derive", "halfvec")
    assert result.returncode != 0
    assert "the live column is already halfvec(384)" in result.stderr


def test_a_model_migration_from_a_halfvec_column_keeps_halfvec(stack: Stack) -> None:
    """A team whose live column is halfvec (config, or `--derive halfvec` before the config
    said so) keeps half the bytes across models; the config's vector_type, when set,
    decides."""
    require_server(stack.dsn, server_versions.HALFVEC)
    write_config(stack.config_path, docs_config(target_extra='vector_type = "halfvec"'))
    seed(stack, 3)
    assert stack.cli("init").returncode == 0
    assert column_type(stack, "embedding") == "halfvec(384)"
    write_config(stack.config_path, docs_config())  # the registry says halfvec, not the config
    new = ("--model", "fake-alt-384", "--dimensions", "384")
    plan = json.loads(migrate(stack, "plan", "--json", *new))
    assert [n for n in plan["notes"] if "halfvec(384), as the live column is" in n], plan
    migrate(stack, "start", *new)
    assert column_type(stack, new_column(stack)) == "halfvec(384)"
    migrate(stack, "cancel")
    write_config(stack.config_path, docs_config(target_extra='vector_type = "vector"'))
    plan = json.loads(migrate(stack, "plan", "--json", *new))
    assert not [n for n in plan["notes"] if "halfvec" in n], plan
    migrate(stack, "start", *new)
    assert column_type(stack, new_column(stack)) == "vector(384)"
