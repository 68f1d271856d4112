"""`import-pgai --take-over` / `--undo` of a column destination (`ai.destination_column`)
against a real pgai 0.12.1 whose worker runs throughout (issue 26): the keys in pgai's
queue become ordinary pending rows (0 lost, a row an app transaction holds is not waited
on), pgai's failures are recorded, pgai's worker writes nothing after, every vector is
the model's vector of its row's current text; the undo hands back and pgai converges.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from types import SimpleNamespace
from typing import Any

import numpy as np
import psycopg
import pytest

from pgreembed.testing import pgai_side
from pgreembed.testing.fake_openai import FakeOpenAIServer
from pgreembed.testing.fake_vectors import fake_vector
from tests import pgai_takeover_side as takeover_side
from tests.app_side import repeatable_read_by_default
from tests.helpers import API_KEY, OrdinaryRoles, Stack, json_document, pgai_keeps_it, wait_for
from tests.pgai_takeover_side import (
    DIMS,
    MODEL,
    import_pgai,
    pgai_in_flight,
    pgai_rows_written,
)

VECTORIZER = "notes_v"
ROWS = 100
HOLD = "hold this pgai batch"
TOML = f"""
[[target]]
name = "{VECTORIZER}"
table = "public.notes"
text_column = "body"
primary_key = "id"
vector_column = "embedding"
provider = "openai"
model = "{MODEL}"
dimensions = {DIMS}
batch_size = 32

[worker]
poll_interval = 0.5
"""


def text(key: int, version: str) -> str:
    return f"note {key} about vacuum and indexes, version {version}."


def write(conn: psycopg.Connection, keys: range | list[int], version: str) -> None:
    """Insert the keys, or edit their text if they exist (one statement)."""
    conn.execute("INSERT INTO notes (id, body) SELECT * FROM unnest(%s::int[], %s::text[])"
                 " ON CONFLICT (id) DO UPDATE SET body = EXCLUDED.body",
                 (list(keys), [text(k, version) for k in keys]))


def wrong(conn: psycopg.Connection, skip: set[int]) -> list[int]:
    """Rows whose vector is not the model's vector of their current text (NULL counts)."""
    return [key for key, body, vector in conn.execute("SELECT id, body, embedding FROM notes")
            if key not in skip and (vector is None or not np.allclose(
                vector.to_numpy(), fake_vector(MODEL, body, DIMS), atol=1e-5))]


def triggers(conn: psycopg.Connection, vec: pgai_side.VectorizerRow) -> set[bool]:
    return {state != "D" for (state,) in conn.execute(
        "SELECT tgenabled FROM pg_trigger WHERE tgrelid = 'notes'::regclass"
        " AND tgname LIKE %s", (vec.trigger_name + "%",))}


def granted_as_printed(stack: Stack, roles: OrdinaryRoles, conn: psycopg.Connection,
                       vec: pgai_side.VectorizerRow, vectorizer: str) -> list[str]:
    """--take-over as the ordinary role is refused before any change, naming each missing
    right as the GRANT that gives it; the admin (`conn`) runs them as printed, in rounds
    (the catalog's first, then the vectorizer's) until the plan passes. The GRANTs run."""
    refused = import_pgai(stack.env, "--vectorizer", vectorizer, "--take-over",
                          "--no-embed-check", "--json")
    assert refused.returncode == 4, refused.stdout + refused.stderr
    message = json_document(refused.stdout)["error"]["message"]
    assert f'GRANT USAGE ON SCHEMA "ai" TO "{roles.pgreembed}";' in message, message
    assert conn.execute("SELECT disabled FROM ai.vectorizer").fetchone() == (False,)
    ran: list[str] = []
    while True:
        grants = [g for g in message.split("`")[1::2] if g.startswith("GRANT")]
        assert grants and not set(grants) & set(ran), message
        for grant in grants:
            conn.execute(grant)
        ran += grants
        again = import_pgai(stack.env, "--vectorizer", vectorizer, "--json")
        if again.returncode == 0:
            break
        message = json_document(again.stdout)["error"]["message"]
    queue, failed = (psycopg.sql.Identifier(*t.split(".")).as_string(None) for t in
                     (vec.queue_table, vec.queue_failed_table))
    assert f"GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE {queue}" in " ".join(ran), ran
    assert f"GRANT SELECT ON TABLE {failed}" in " ".join(ran), ran
    assert len(ran) == 6, ran  # schema ai, its 3 tables, the queue, the failed queue
    return ran


@pytest.mark.timeout(400)
def test_column_destination_take_over_and_undo(stack: Stack,
                                               fake_openai: FakeOpenAIServer) -> None:
    stack.config_path.write_text(TOML)
    pgai_side.install_pgai(stack.dsn)
    with stack.connect() as conn:
        conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text NOT NULL)")
        write(conn, range(1, ROWS + 1), "0")
        pgai_side.create_vectorizer(conn, pgai_side.VectorizerSpec(
            source="public.notes", name=VECTORIZER, destination="column", chunking="none",
            model=MODEL, dimensions=DIMS, base_url=fake_openai.base_url, batch_size=20))
    pgai_side.run_pgai_worker_once(stack.dsn, API_KEY)
    with stack.connect() as conn:
        vec = pgai_side.vectorizer_row(conn, VECTORIZER)
        # pgai's batches of one key from here on: the first (row 1) is held at the provider
        # while keys pile up in its queue.
        conn.execute("UPDATE ai.vectorizer SET config = jsonb_set(config,"
                     " '{processing,batch_size}', '1') WHERE id = %s", (vec.id,))
        fake_openai.set_faults(hold_marker=HOLD)
        conn.execute("UPDATE notes SET body = body || %s WHERE id = 1", (" " + HOLD,))
        # Edited before the adoption: queued in pgai's queue, their old vectors still in
        # place (pgai keeps them until it re-embeds): the take-over must make them pending.
        write(conn, range(81, 91), "1")
    # Adopted while no pgai batch is open (init's CREATE INDEX CONCURRENTLY of the pending
    # index waits for every open transaction, a pgai batch held at its provider included).
    done = import_pgai(stack.env, "--vectorizer", VECTORIZER, "--adopt", "--no-embed-check")
    assert done.returncode == 0, done.stdout + done.stderr
    assert pgai_keeps_it(stack)  # status: pgai's worker keeps the column current
    pgai = pgai_side.start_pgai_worker(stack.dsn, API_KEY, stack.logs / "pgai.log")
    stack.processes.append(pgai)
    stack.start_worker(threads=4)
    stack.start_scheduler()  # adopted, pgai in charge: the scheduler sends nothing
    with stack.connect() as conn:
        assert conn.execute("SELECT paused_by FROM pgreembed.slots WHERE target = %s",
                            (VECTORIZER,)).fetchone() == ("pgai",)
        wait_for(lambda: pgai_in_flight(conn) > 0, timeout=60,
                 message="pgai's worker holding a batch at the provider")
        write(conn, range(2, 31), "1")  # 29 edits after the adoption
        write(conn, range(ROWS + 1, ROWS + 61), "1")  # 60 inserts
        failed = [ROWS + 61, ROWS + 62]
        write(conn, failed, "f")
        conn.execute("DELETE FROM " + vec.queue_table + " WHERE id = ANY(%s)", (failed,))
        for key in failed:  # what pgai writes when it gives up on a key (one transaction)
            with conn.transaction():
                conn.execute("INSERT INTO " + vec.queue_failed_table + " (id, failure_step)"
                             " VALUES (%s, 'embedding')", (key,))
                conn.execute("INSERT INTO ai._vectorizer_errors (id, message) VALUES (%s,"
                             " 'embedding failed: input rejected')", (vec.id,))
        queued = {r[0] for r in conn.execute("SELECT DISTINCT id FROM " + vec.queue_table)}
        assert len(queued) == 100
    # An app transaction holds row 5 (queued) through the take-over: never waited on.
    holder = psycopg.connect(stack.dsn)
    holder.execute("SELECT FROM notes WHERE id = 5 FOR UPDATE")
    command = subprocess.Popen([sys.executable, "-m", "pgreembed", "import-pgai",
                                "--vectorizer", VECTORIZER, "--take-over", "--no-embed-check",
                                "--json"], env=stack.env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    with stack.connect() as conn:
        wait_for(lambda: conn.execute("SELECT disabled FROM ai.vectorizer WHERE id = %s",
                                      (vec.id,)).fetchone() == (True,),
                 timeout=60, message="pgai's vectorizer disabled")
        fake_openai.set_faults(hold_marker=None)  # pgai's batch ends, then the cut-over

        def left() -> Any:
            if conn.execute("SELECT to_regclass('pgreembed.pgai_takeovers')").fetchone() \
                    == (None,):
                return None
            return conn.execute("SELECT in_flight FROM pgreembed.pgai_takeovers WHERE"
                                " target = %s AND state = 'taken'", (VECTORIZER,)).fetchone()

        wait_for(lambda: left() == (["5"],) or command.poll() is not None, timeout=60,
                 message="cut over, the held row's key kept for later")
        assert command.poll() is None, command.communicate()
    holder.rollback()
    holder.close()
    out, err = command.communicate(timeout=120)
    assert command.returncode == 0, out + err
    (report,) = json_document(out)["vectorizers"]
    print(json.dumps(report))
    report = SimpleNamespace(**report)
    assert report.state == "taken" and report.in_flight_left == 0
    # pgai's batch (key 1) ended before the switch; the other 99 keys were made pending.
    assert report.keys_marked == 99 and report.queued_rows >= 99
    assert (report.failed_recorded, report.failed_superseded) == (2, 0)
    with stack.connect() as conn:
        assert triggers(conn, vec) == {False}
        assert conn.execute("SELECT count(*) FROM " + vec.queue_table).fetchone() == (0,)
        assert conn.execute("SELECT paused_by FROM pgreembed.slots WHERE target = %s",
                            (VECTORIZER,)).fetchone() == (None,)
        listed = stack.cli("failures", "--target", VECTORIZER, "--json")
        assert listed.returncode == 0, listed.stderr
        reasons = {f["key"]: f["reason"] for f in json_document(listed.stdout)["failures"]}
        assert set(reasons) == {str(k) for k in failed}, reasons
        assert all("input rejected" in r for r in reasons.values()), reasons
        by_pgai = pgai_rows_written(conn)
        wait_for(lambda: wrong(conn, set(failed)) == [], timeout=120, interval=0.5,
                 message="every queued key embedded by pgreembed")
        sent_before = dict(fake_openai.stats()["text_counts"])
        write(conn, range(ROWS + 100, ROWS + 120), "2")  # inserts and edits after
        write(conn, range(41, 61), "2")  # (none of them queued at the take-over)
        wait_for(lambda: wrong(conn, set(failed)) == [], timeout=120, interval=0.5,
                 message="writes after the take-over embedded")
        sent = {t: n - sent_before.get(t, 0) for t, n in
                fake_openai.stats()["text_counts"].items() if n > sent_before.get(t, 0)}
        assert sorted(sent) == sorted(text(k, "2") for k in [*range(ROWS + 100, ROWS + 120),
                                                              *range(41, 61)])
        assert max(sent.values()) == 1
        time.sleep(2)  # pgai's worker polls every second: give it the chance to write
        assert pgai.poll() is None and pgai_rows_written(conn) == by_pgai

        # Undo with work left on our side (10 edits held at the provider).
        fake_openai.set_faults(hold_marker="version 3.")
        write(conn, range(61, 71), "3")
    done = import_pgai(stack.env, "--vectorizer", VECTORIZER, "--undo", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    (undone,) = json_document(done.stdout)["vectorizers"]
    assert undone["state"] == "undone" and undone["keys_marked"] >= 10, undone
    assert pgai_keeps_it(stack)
    fake_openai.set_faults(hold_marker=None)
    with stack.connect() as conn:
        assert triggers(conn, vec) == {True}
        write(conn, range(71, 76), "4")  # after the undo: pgai's trigger queues them
        wait_for(lambda: conn.execute("SELECT count(*) FROM " + vec.queue_table).fetchone()
                 == (0,) and wrong(conn, set(failed)) == [], timeout=150, interval=0.5,
                 message="pgai's worker converging after the undo")
        assert pgai_rows_written(conn) > by_pgai


@pytest.mark.timeout(300)
def test_take_over_and_undo_as_an_ordinary_role_that_owns_the_source(
        ordinary_roles: tuple[Stack, OrdinaryRoles], fake_openai: FakeOpenAIServer) -> None:
    """pgai installed and the vectorizer made by an admin (its catalog and queues are the
    admin's); pgreembed's role is a member of the source's owner role, no superuser. It is
    refused before any change, naming each missing right as the GRANT that gives it; once
    the admin ran those GRANTs (pasted as printed), --take-over and --undo work."""
    stack, roles = ordinary_roles
    stack.config_path.write_text(TOML)
    pgai_side.install_pgai(stack.dsn)
    with stack.connect() as conn:
        conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text NOT NULL)")
        write(conn, range(1, 21), "0")
        pgai_side.create_vectorizer(conn, pgai_side.VectorizerSpec(
            source="public.notes", name=VECTORIZER, destination="column", chunking="none",
            model=MODEL, dimensions=DIMS, base_url=fake_openai.base_url))
    pgai_side.run_pgai_worker_once(stack.dsn, API_KEY)
    with stack.connect() as conn:
        conn.execute(psycopg.sql.SQL("ALTER TABLE notes OWNER TO {}").format(
            psycopg.sql.Identifier(roles.owner)))
        write(conn, [3, 4], "1")  # queued for pgai
        vec = pgai_side.vectorizer_row(conn, VECTORIZER)

    with stack.connect() as conn:
        granted_as_printed(stack, roles, conn, vec, VECTORIZER)
        assert triggers(conn, vec) == {True}

    done = import_pgai(stack.env, "--vectorizer", VECTORIZER, "--take-over",
                       "--no-embed-check", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    (report,) = json_document(done.stdout)["vectorizers"]
    assert (report["state"], report["keys_marked"]) == ("taken", 2), report
    with stack.connect() as conn:
        assert triggers(conn, vec) == {False}
        assert conn.execute("SELECT disabled FROM ai.vectorizer").fetchone() == (True,)
        assert conn.execute("SELECT count(*) FROM notes WHERE embedding IS NULL"
                            ).fetchone() == (2,)
    undone = import_pgai(stack.env, "--vectorizer", VECTORIZER, "--undo", "--json")
    assert undone.returncode == 0, undone.stdout + undone.stderr
    with stack.connect() as conn:
        assert triggers(conn, vec) == {True}
        assert conn.execute("SELECT disabled FROM ai.vectorizer").fetchone() == (False,)
        assert conn.execute("SELECT count(DISTINCT id) FROM " + vec.queue_table
                            ).fetchone() == (2,)


@pytest.mark.timeout(400)
def test_a_chunk_table_taken_over_and_kept_current_by_an_ordinary_role(
        ordinary_roles: tuple[Stack, OrdinaryRoles], fake_openai: FakeOpenAIServer) -> None:
    """A table destination, pgai's chunk table and view made by the admin: pgreembed's role
    (a member of the owner role of the source and of the chunk table, no superuser) is
    told the GRANTs, then takes over, and its scheduler and worker keep every chunk set
    current (the keys queued at the take-over, edits and inserts after it: each set equal
    to the split of its parent's text, each vector the model's vector of its chunk), under
    a database default of REPEATABLE READ; --undo hands back."""
    stack, roles = ordinary_roles
    settings = takeover_side.settings_for(stack.config_path, stack.env, batch_size=16)
    vec = takeover_side.pgai_filled(stack.dsn, fake_openai.base_url, API_KEY, 20)
    repeatable_read_by_default(stack)
    with stack.connect() as conn:
        for table in ("docs", takeover_side.CHUNKS):  # pgai made its tables as the admin
            conn.execute(psycopg.sql.SQL("ALTER TABLE {} OWNER TO {}").format(
                psycopg.sql.Identifier(table), psycopg.sql.Identifier(roles.owner)))
        takeover_side.edit(conn, [3, 4], "1")  # queued for pgai
        granted_as_printed(stack, roles, conn, vec, takeover_side.VECTORIZER)
    done = import_pgai(stack.env, "--vectorizer", takeover_side.VECTORIZER, "--take-over",
                       "--no-embed-check", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    (report,) = json_document(done.stdout)["vectorizers"]
    assert (report["state"], report["keys_marked"]) == ("taken", 2), report
    stack.start_worker(threads=4)
    stack.start_scheduler()
    with psycopg.connect(roles.app_dsn, autocommit=True) as app:
        takeover_side.edit(app, [5, 6], "2")
        takeover_side.insert(app, [21, 22], "0")
    with stack.connect() as conn:
        wait_for(lambda: takeover_side.settled(conn, settings), timeout=120,
                 message="every chunk set current and embedded as the ordinary role")
        assert takeover_side.wrong_vectors(conn) == []
    undone = import_pgai(stack.env, "--vectorizer", takeover_side.VECTORIZER, "--undo",
                         "--json")
    assert undone.returncode == 0, undone.stdout + undone.stderr
    with stack.connect() as conn:
        assert conn.execute("SELECT disabled FROM ai.vectorizer").fetchone() == (False,)
    assert "Traceback" not in stack.log_text()
