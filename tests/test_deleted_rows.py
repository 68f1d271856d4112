"""Deleted rows leave no work behind: state rows go with them, pending work joins the table.

Issue 11: after an in-place model change, state rows of deleted rows looked
outdated forever ("enqueued 100 rows" every second, `tick --wait` never done).
"""

from __future__ import annotations

import uuid

import numpy as np
import psycopg
import pytest
import redis
from psycopg import sql

from pgreembed.config import load_settings
from pgreembed.store.orphans import OrphanSweep
from pgreembed.store.pending import sweep
from pgreembed.store.slots import load_slots
from pgreembed.testing.fake_vectors import fake_vector
from tests.helpers import Stack, counts, json_document, seed


def embed_all(stack: Stack) -> None:
    assert stack.cli("init").returncode == 0
    stack.start_worker()
    result = stack.cli("tick", "--wait", "--timeout", "60")
    assert result.returncode == 0, result.stdout + result.stderr


def state_keys(stack: Stack, slot_id: int = 1) -> set[int]:
    with stack.connect() as conn:
        return {r[0] for r in conn.execute(sql.SQL("SELECT pgr_pk FROM {}").format(
            sql.Identifier("pgreembed", f"slot_{slot_id}")))}


def app_keys(stack: Stack) -> set[int]:
    with stack.connect() as conn:
        return {r[0] for r in conn.execute("SELECT id FROM docs")}


def delete_without_triggers(stack: Stack, where: str) -> None:
    """As while `trigger = false`, or before this version installed the DELETE trigger."""
    with stack.connect() as conn:
        conn.execute("ALTER TABLE docs DISABLE TRIGGER USER")
        conn.execute(f"DELETE FROM docs WHERE {where}")
        conn.execute("ALTER TABLE docs ENABLE TRIGGER USER")


def change_model(stack: Stack, model: str) -> None:
    config = stack.config_path.read_text()
    assert 'model = "fake-384"' in config
    stack.config_path.write_text(config.replace('model = "fake-384"', f'model = "{model}"'))


@pytest.mark.second_server
def test_in_place_model_change_after_deletes_finishes_and_forgets_deleted_rows(stack: Stack
                                                                              ) -> None:
    seed(stack, 30, body="body of ")
    embed_all(stack)
    with stack.connect() as conn:
        conn.execute("DELETE FROM docs WHERE id % 3 = 0")
    assert state_keys(stack) == app_keys(stack)  # the DELETE trigger took their state rows
    change_model(stack, "alt-384")
    assert stack.cli("init").returncode == 0
    result = stack.cli("tick", "--wait", "--timeout", "60")
    assert result.returncode == 0, result.stdout + result.stderr

    status = json_document(stack.cli("status", "--json").stdout)["columns"]
    live = next(s for s in status if s["role"] == "live")
    assert live["model"] == "openai:alt-384@384"
    assert (live["total"], live["embedded"], live["pending"], live["outdated"],
            live["failed"]) == (20, 20, 0, 0, 0)
    assert state_keys(stack) == app_keys(stack)
    with stack.connect() as conn:
        rows = conn.execute("SELECT concat_ws(E'\\n', title, body), embedding FROM docs"
                            ).fetchall()
    for text, vector in rows:
        np.testing.assert_allclose(vector.to_numpy(), fake_vector("alt-384", text, 384),
                                   atol=1e-6)
    again = stack.cli("tick")
    assert again.returncode == 0
    assert counts(r"enqueued (\d+) rows", again.stdout) == [(0,)], again.stdout


def test_state_rows_of_rows_deleted_without_triggers_are_no_work_and_get_swept(
        stack: Stack, redis_url: str) -> None:
    seed(stack, 25, body="body of ")
    embed_all(stack)
    delete_without_triggers(stack, "id % 2 = 0")
    deleted = {k for k in range(1, 26) if k % 2 == 0}
    assert deleted <= state_keys(stack)  # orphans, as left by earlier versions
    change_model(stack, "alt-384")
    assert stack.cli("init").returncode == 0
    settings = load_settings(stack.config_path, stack.env)
    with psycopg.connect(stack.dsn) as conn:
        slot = next(s for s in load_slots(conn, settings.target("docs")) if s.role == "live")
        pending = {k for page in sweep(conn, slot, lambda: 4) for k in page}
        assert pending == app_keys(stack)  # every live row is outdated; no deleted one
        client = redis.Redis.from_url(redis_url)
        orphans = OrphanSweep(client, page_rows=5)
        client.delete("pgreembed:orphans:1:due")  # the ticks above swept (nothing) already
        removed = [orphans.step(conn, slot)]
        assert removed[0] > 0
        assert orphans.step(conn, slot) == 0  # at most one page per interval
        while state_keys(stack) != app_keys(stack) and len(removed) < 20:
            client.delete("pgreembed:orphans:1:due")
            removed.append(orphans.step(conn, slot))
        assert state_keys(stack) == app_keys(stack)
        assert sum(removed) == len(deleted)
        assert all(n <= 5 for n in removed)  # a page of 5 state rows deletes at most 5
    result = stack.cli("tick", "--wait", "--timeout", "60")
    assert result.returncode == 0, result.stdout + result.stderr
    status = json_document(stack.cli("status", "--json").stdout)["columns"]
    assert (status[0]["total"], status[0]["embedded"], status[0]["outdated"]) == (13, 13, 0)


@pytest.mark.second_server
def test_app_role_deletes_and_truncates_without_rights_on_our_state_tables(stack: Stack
                                                                         ) -> None:
    seed(stack, 12, body="body of ")
    embed_all(stack)
    role = f"app_{uuid.uuid4().hex[:8]}"
    with stack.connect() as conn:
        conn.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(role)))
        conn.execute(sql.SQL("GRANT SELECT, DELETE, TRUNCATE ON docs TO {}").format(
            sql.Identifier(role)))
    try:
        with psycopg.connect(stack.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
            conn.execute("DELETE FROM docs WHERE id <= 4")
            assert state_keys(stack) == app_keys(stack) == set(range(5, 13))
            conn.execute("TRUNCATE docs")
        assert state_keys(stack) == set()
    finally:
        with stack.connect() as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
    seed(stack, 3, body="body of ")
    result = stack.cli("tick", "--wait", "--timeout", "60")
    assert result.returncode == 0, result.stdout + result.stderr
    assert state_keys(stack) == app_keys(stack)
