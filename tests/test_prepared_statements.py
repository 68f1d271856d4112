"""`[worker] prepared_statements`: the write path's statements prepared on the pool's
connections (store.pool), or not at all; and a prepared statement lost by the session (a
pooler in transaction mode) is the config's fault: named, no row failed, nothing bought
twice (invariant 8).
"""

from __future__ import annotations

import dataclasses
import os
import threading
import tomllib
from typing import Any
from unittest import mock

import psycopg
import pytest

from pgreembed.config import Settings, parse_settings
from pgreembed.errors import DatabaseError
from pgreembed.store.pool import close_pools, get_pool
from pgreembed.testing.fake_openai import FakeOpenAIServer
from tests.helpers import Stack, seed, wait_for


def _settings(stack: Stack, prepared: bool) -> Settings:
    """The stack's settings, one pooled connection per process (the test inspects it)."""
    settings = parse_settings(tomllib.loads(stack.config_path.read_text()), stack.env)
    return dataclasses.replace(settings, pool_max_size=1, prepared_statements=prepared)


def _process_batch() -> Any:
    from worker.batch import process_batch  # importing `worker` builds its broker
    return process_batch


def _slot_id(stack: Stack) -> int:
    with stack.connect() as conn:
        row = conn.execute("SELECT id FROM pgreembed.slots WHERE role = 'live'").fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.parametrize("prepared", [True, False])
def test_the_write_path_prepares_its_statements_only_when_on(stack: Stack,
                                                             prepared: bool) -> None:
    """On: the batch's statements are prepared on the pooled connection, the write's
    UPDATE and state INSERT among them, and none that returns a vector (a swap that
    changes the column's type would break it). Off: nothing is prepared."""
    seed(stack, 6)
    assert stack.cli("init").returncode == 0
    settings = _settings(stack, prepared)
    close_pools()
    try:
        with mock.patch.dict(os.environ, stack.env):
            report = _process_batch()(settings, "docs", _slot_id(stack),
                                      [str(k) for k in range(1, 7)])
        assert report.written == 6
        with get_pool(settings.database_url, 1).connection() as conn:
            statements = [row[0] for row in conn.execute(
                "SELECT statement FROM pg_prepared_statements ORDER BY prepare_time")]
            types = [row[0] for row in conn.execute(
                "SELECT DISTINCT unnest(result_types)::text FROM pg_prepared_statements")]
    finally:
        close_pools()
    if not prepared:
        assert statements == []
        return
    assert any(s.startswith("UPDATE ") and "FROM unnest(" in s for s in statements)
    assert any(s.lstrip().startswith("INSERT INTO \"pgreembed\".\"slot_") for s in statements)
    assert len(statements) >= 7, statements
    assert not {"vector", "halfvec"} & set(types), types


def test_a_lost_prepared_statement_names_the_setting_and_fails_no_row(
        stack: Stack, fake_openai: FakeOpenAIServer) -> None:
    """The session loses its prepared statements while the provider embeds (as when a
    pooler in transaction mode hands the next transaction another server connection):
    the write fails with an error naming the setting; no row is marked failed; with the
    setting off, the next attempt writes the vectors bought without buying them again."""
    seed(stack, 3, title="first")
    seed(stack, 3, title="HOLD")
    assert stack.cli("init").returncode == 0
    slot_id = _slot_id(stack)
    settings = _settings(stack, True)
    close_pools()
    errors: list[BaseException] = []
    try:
        with mock.patch.dict(os.environ, stack.env):
            process_batch = _process_batch()
            assert process_batch(settings, "docs", slot_id, ["1", "2", "3"]).written == 3

            def held_batch() -> None:
                try:
                    process_batch(settings, "docs", slot_id, ["4", "5", "6"])
                except BaseException as exc:  # noqa: BLE001 - the test reads it
                    errors.append(exc)

            fake_openai.reset()
            fake_openai.set_faults(hold_marker="HOLD")
            batch = threading.Thread(target=held_batch)
            batch.start()
            try:
                wait_for(lambda: fake_openai.stats()["requests"] >= 1,
                         message="the held request")
                with get_pool(settings.database_url, 1).connection() as conn:
                    # Behind psycopg's back, as another server connection would be.
                    conn.pgconn.exec_(b"DEALLOCATE ALL")
            finally:
                fake_openai.set_faults(hold_marker=None)
                batch.join(60)
            assert len(errors) == 1 and isinstance(errors[0], DatabaseError), errors
            assert "prepared_statements = false" in str(errors[0])
            assert isinstance(errors[0].__cause__, psycopg.errors.InvalidSqlStatementName)
            with stack.connect() as conn:
                assert conn.execute(
                    "SELECT count(*) FROM pgreembed.slot_1 WHERE pgr_failed_hash IS NOT NULL"
                ).fetchone() == (0,)
                assert conn.execute("SELECT count(*) FROM docs WHERE embedding IS NULL"
                                    ).fetchone() == (3,)
            bought = fake_openai.stats()["requests"]
            close_pools()
            report = process_batch(_settings(stack, False), "docs", slot_id,
                                   ["4", "5", "6"])
    finally:
        close_pools()
    assert (report.written, report.failed) == (3, 0)
    assert fake_openai.stats()["requests"] == bought  # the kept vectors, not bought again
