"""A migration between providers is an ordinary migration: openai -> cohere side by side
(start, index, swap) and back (rollback), under a concurrent writer and a slowed provider,
on a database as users run it (pgreembed as an ordinary role, REPEATABLE READ by default, an
app view and SQL function on the vector column, app transactions holding rows), with every
row of both columns holding its own model's vector for its current text."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

from pgreembed.testing.fake_cohere import FakeCohereServer
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
    migrate,
    seed,
    start_migration,
    steady_writer,
    wait_filled,
    wait_for,
    write_config,
)

KEY = "co-test-key-for-migrations"
# The same size as the live fake-384: a vector of the wrong model would fit the column.
COHERE_MODEL = "embed-english-light-v3.0"


@pytest.fixture(scope="module")
def cohere_server() -> Iterator[FakeCohereServer]:
    server = FakeCohereServer(api_key=KEY).start()
    yield server
    server.stop()


def test_openai_to_cohere_and_back(ordinary_roles: tuple[Stack, OrdinaryRoles],
                                   cohere_server: FakeCohereServer) -> None:
    stack, roles = ordinary_roles  # pgreembed's processes run as the ordinary role
    repeatable_read_by_default(stack)
    app = dataclasses.replace(stack, dsn=roles.app_dsn)  # the writer runs as the app
    cohere_server.reset()
    cohere_server.set_faults(latency=0.05)  # slowed: its writes race the app's edits
    write_config(stack.config_path, docs_config(target_extra=f"""
[target.cohere]
base_url = "{cohere_server.base_url}"
"""))
    stack.env["CO_API_KEY"] = KEY
    seed(stack, 60)
    init = stack.cli("init")
    assert init.returncode == 0, init.stdout + init.stderr
    create_app_objects(stack, roles)  # on the column init added
    stack.start_worker(threads=4)
    stack.start_scheduler()
    wait_filled(stack, "embedding")
    with steady_writer(app, per_second=5.0, edits=range(1, 61)) as filling:
        column = start_migration(stack, "--provider", "cohere", "--model", COHERE_MODEL,
                                 "--dimensions", "384")
        wait_for(lambda: cohere_server.stats()["inputs_embedded"] >= 60, timeout=120,
                 message="cohere embedded the table's rows")
    wait_filled(stack, column)
    migrate(stack, "index")
    with steady_writer(app, per_second=5.0, edits=range(1, 61)) as swapped, \
            app_transactions(roles.app_dsn, range(1, 61)) as transactions:
        assert "swap done" in migrate(stack, "swap")
        before = cohere_server.stats()["inputs_embedded"]
        # The app's edits are embedded by the live model now: cohere's.
        wait_for(lambda: cohere_server.stats()["inputs_embedded"] >= before + 5, timeout=60,
                 message="edits embedded by cohere after the swap")
        assert "rollback done" in migrate(stack, "rollback")
    for writes in (filling, swapped):
        assert writes["edits"] > 0 and writes["errors"] == 0
    assert transactions.done > 10
    assert transactions.errors == [] and transactions.held == [], transactions
    wait_filled(stack, "embedding")
    wait_filled(stack, column)
    # Rolled back: the live column is openai's again, the incoming one cohere's, and every
    # row of each is its model's vector of its current text (0 wrong-model rows).
    assert_column_current(stack, "embedding", "fake-384", 384)
    assert_column_current(stack, column, COHERE_MODEL, 384)
    assert_app_reads_live(roles)  # the view and the function serve the live column
    with stack.connect() as conn:
        keys = dict(conn.execute("SELECT vector_column, m.key FROM pgreembed.slots s"
                                 " JOIN pgreembed.models m ON m.id = s.model_id"
                                 " WHERE s.target = 'docs'").fetchall())
    assert keys == {"embedding": "openai:fake-384@384",
                    column: f"cohere:{COHERE_MODEL}@384"}
    stats = cohere_server.stats()
    assert set(stats["input_types"]) == {"search_document"}  # rows are documents
    assert stats["inputs_embedded"] >= 60
    # The quality gate embeds its sampled texts as the queries they stand for.
    report = json_document(migrate(stack, "compare", "--sample", "5", "--json"))
    assert report["columns"]["incoming"]["model"] == f"cohere:{COHERE_MODEL}@384"
    assert cohere_server.stats()["input_types"]["search_query"] == report["queries"] == 5
