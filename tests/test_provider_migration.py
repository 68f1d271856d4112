"""A migration between providers is an ordinary migration: openai -> cohere side by side
(start, index, swap) and back (rollback), under a concurrent writer and a slowed provider,
with every row of both columns holding its own model's vector for its current text."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pgreembed.testing.fake_cohere import FakeCohereServer
from tests.helpers import (
    Stack,
    assert_column_current,
    docs_config,
    json_document,
    migrate,
    running,
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


def test_openai_to_cohere_and_back(stack: Stack, cohere_server: FakeCohereServer) -> None:
    cohere_server.reset()
    cohere_server.set_faults(latency=0.05)  # slowed: its writes race the app's edits
    write_config(stack.config_path, docs_config(target_extra=f"""
[target.cohere]
base_url = "{cohere_server.base_url}"
"""))
    stack.env["CO_API_KEY"] = KEY
    seed(stack, 60)
    running(stack)
    wait_filled(stack, "embedding")
    with steady_writer(stack, per_second=5.0, edits=range(1, 61)) as filling:
        column = start_migration(stack, "--provider", "cohere", "--model", COHERE_MODEL,
                                 "--dimensions", "384")
        wait_for(lambda: cohere_server.stats()["inputs_embedded"] >= 60, timeout=120,
                 message="cohere embedded the table's rows")
    wait_filled(stack, column)
    migrate(stack, "index")
    with steady_writer(stack, per_second=5.0, edits=range(1, 61)) as swapped:
        assert "swap done" in migrate(stack, "swap")
        before = cohere_server.stats()["inputs_embedded"]
        # The app's edits are embedded by the live model now: cohere's.
        wait_for(lambda: cohere_server.stats()["inputs_embedded"] >= before + 5, timeout=60,
                 message="edits embedded by cohere after the swap")
        assert "rollback done" in migrate(stack, "rollback")
    for writes in (filling, swapped):
        assert writes["edits"] > 0 and writes["errors"] == 0
    wait_filled(stack, "embedding")
    wait_filled(stack, column)
    # Rolled back: the live column is openai's again, the incoming one cohere's, and every
    # row of each is its model's vector of its current text (0 wrong-model rows).
    assert_column_current(stack, "embedding", "fake-384", 384)
    assert_column_current(stack, column, COHERE_MODEL, 384)
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
