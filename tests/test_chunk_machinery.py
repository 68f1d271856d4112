"""The existing machinery on a chunk table, as issue 25 asks ("derive, tune, Batch API,
compare ... run on it unchanged"): a derived column filled in SQL, a Batch API fill with
parents edited meanwhile, compare, swap, finalize and tune, each chunk's vector checked
against its model's vector for its current text; then a model change in the config goes
side by side on the chunk table and is swapped in by the scheduler (scheduler + Redis +
worker)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from pgreembed.store import server_versions
from pgreembed.testing.fake_openai import FakeOpenAIServer
from pgreembed.testing.fake_vectors import fake_vector
from tests.helpers import (
    Stack,
    json_document,
    migrate,
    migrations,
    new_column,
    require_server,
    side_fill_section,
    wait_for,
    write_config,
)
from tests.test_chunked_pipeline import body, running_with_parents, settled
from tests.test_chunked_targets import CHUNKED, chunk_sets, expected


def chunk_vectors_current(stack: Stack, target: object, column: str, model: str,
                          dims: int) -> int:
    """Every chunk set is its parent's current text's and every chunk's vector in `column`
    is `model`'s vector of its text at `dims`; the number of chunks checked."""
    with stack.connect() as conn:
        assert chunk_sets(conn) == expected(conn, target)
        rows = conn.execute(f"SELECT chunk, {column} FROM docs_chunks").fetchall()
    for text, vector in rows:
        assert vector is not None, f"chunk {text[:40]!r}: no vector in {column}"
        np.testing.assert_allclose(vector.to_numpy(), fake_vector(model, text, dims),
                                   atol=1e-6, err_msg=f"{column} of {text[:40]!r}")
    return len(rows)


def filled(stack: Stack, target: object, column: str) -> bool:
    with stack.connect() as conn:
        left = conn.execute(f"SELECT count(*) FROM docs_chunks WHERE embedding IS NULL"
                            f" OR {column} IS NULL").fetchone()
    return left == (0,) and settled(stack, target)


def edit_parents(stack: Stack, keys: range, version: str) -> None:
    with stack.connect() as conn:
        for key in keys:
            conn.execute("UPDATE docs SET body = %s WHERE id = %s",
                         (body(random.Random(key), key, version), key))


@pytest.mark.timeout(300)
def test_derive_batch_api_compare_tune_and_side_fill_run_on_a_chunk_table(
        stack: Stack, fake_openai: FakeOpenAIServer) -> None:
    require_server(stack.dsn, server_versions.DERIVE_DIMENSIONS)
    target = running_with_parents(stack, ((key, f"t{key}", body(random.Random(key), key, "0"))
                                          for key in range(1, 31)))
    chunks = chunk_vectors_current(stack, target, "embedding", "fake-384", 384)
    assert chunks >= 30

    # derive: the new column filled in SQL from the live one, no provider request.
    fake_openai.reset()
    derived = json_document(stack.cli("migrate", "plan", "--target", "docs", "--derive",
                                      "dimensions:128", "--json").stdout)
    assert (derived["cost_usd"], derived["provider_inputs"]) == (0.0, 0)
    migrate(stack, "start", "--derive", "dimensions:128")
    column = new_column(stack)
    assert fake_openai.stats()["requests"] == 0
    assert chunk_vectors_current(stack, target, column, "fake-384", 128) == chunks
    migrate(stack, "cancel")

    # The Batch API fills the next column; parents edited meanwhile get new chunks, which
    # the queue embeds in both columns once the batch is in.
    fake_openai.set_faults(batch_delay=1.0)
    migrate(stack, "start", "--model", "fake-768", "--dimensions", "768", "--batch-api")
    column = new_column(stack)
    migrate(stack, "batch")
    edit_parents(stack, range(1, 6), "1")
    migrate(stack, "batch", "--wait", "--poll", "0.5", "--timeout", "120")
    assert fake_openai.stats()["file_downloads"].get("batch_output", 0) >= 1
    wait_for(lambda: filled(stack, target, column), timeout=120, interval=0.5,
             message="both columns filled after the batch")
    chunk_vectors_current(stack, target, column, "fake-768", 768)
    chunk_vectors_current(stack, target, "embedding", "fake-384", 384)

    # compare (needs the new column's index), swap, finalize, then tune on the live index.
    migrate(stack, "index")
    compared = json_document(migrate(stack, "compare", "--sample", "10", "--json"))
    assert compared["queries"] == 10
    migrate(stack, "swap")
    migrate(stack, "finalize")
    edit_parents(stack, range(6, 9), "2")
    wait_for(lambda: settled(stack, target), timeout=120, message="edits after finalize")
    chunk_vectors_current(stack, target, "embedding", "fake-768", 768)
    out = stack.cli("tune", "--target", "docs", "--json", timeout=300)
    assert out.returncode in (0, 4), out.stdout + out.stderr
    tuned = json_document(out.stdout)
    assert tuned["target"] == "docs"

    # A model change in the config: the chunks' new vectors go side by side (the live
    # column keeps serving fake-768) and the scheduler swaps them in.
    write_config(stack.config_path, CHUNKED.format(batch_size=32, destination="").replace(
        'model = "fake-384"', 'model = "fake-alt-768"').replace(
        "dimensions = 384", "dimensions = 768") + side_fill_section(grace_seconds=1))
    result = stack.cli("init")
    assert result.returncode == 0, result.stderr
    assert "re-embedded into the side column" in result.stdout
    assert migrations(stack)[-1][0] == "model_change"
    chunk_vectors_current(stack, target, "embedding", "fake-768", 768)  # not rewritten
    wait_for(lambda: migrations(stack)[-1][1] in ("swapped", "finalized"), timeout=180,
             interval=0.5, message="the side column swapped in")
    wait_for(lambda: settled(stack, target), timeout=120, message="settled after the swap")
    assert chunk_vectors_current(stack, target, "embedding", "fake-alt-768", 768) >= chunks
