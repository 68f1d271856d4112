"""An in-place model change (`init` after the config names another model of the same size)
while batches of the old model are at the provider: their vectors must not land as the
new model's (invariant 7), and the rows they were for must be embedded again by the new
model. The old model's spend stays in the ledger under its own name.
"""

from __future__ import annotations

import uuid
from dataclasses import replace

import numpy as np
import pytest
import redis

from pgreembed.embedding.paid import PaidVectors
from pgreembed.store.slots import Slot
from pgreembed.testing.fake_openai import FakeOpenAIServer
from pgreembed.testing.fake_vectors import fake_vector
from pgreembed.values import Embedded, Row
from tests.helpers import (
    Stack,
    assert_column_current,
    docs_config,
    make_target,
    seed,
    wait_filled,
    wait_for,
    write_config,
)

OLD, NEW, DIMS = "fake-384", "fake-alt-384", 384  # same size: a mix-up fits silently
HELD = "held-at-provider"  # the fake provider keeps requests with this text until released


def _vectors(stack: Stack) -> list[tuple[int, str, np.ndarray]]:
    with stack.connect() as conn:
        rows = conn.execute("SELECT id, concat_ws(E'\\n', title, body), embedding::text"
                            " FROM docs ORDER BY id").fetchall()
    return [(key, text, np.array([float(x) for x in vector.strip("[]").split(",")],
                                 dtype=np.float32)) for key, text, vector in rows]


def _settled(stack: Stack) -> bool:
    """No row without a vector, every state row of the new model and of the row's text."""
    with stack.connect() as conn:
        row = conn.execute(
            """
            SELECT count(*) FILTER (WHERE d.embedding IS NULL OR s.pgr_pk IS NULL
                                    OR m.key <> %s OR s.pgr_hash IS DISTINCT FROM
                                       md5(concat_ws(E'\\n', d.title, d.body))::uuid)
            FROM docs d LEFT JOIN pgreembed.slot_1 s ON s.pgr_pk = d.id
            LEFT JOIN pgreembed.models m ON m.id = s.pgr_model_id
            """, (f"openai:{NEW}@{DIMS}",)).fetchone()
    return row is not None and row[0] == 0


@pytest.mark.second_server
def test_in_place_model_change_never_records_the_old_models_vectors_as_the_new(
        stack: Stack, fake_openai: FakeOpenAIServer) -> None:
    seed(stack, 300)
    assert stack.cli("init").returncode == 0
    stack.start_worker(threads=4)
    stack.start_scheduler()
    wait_filled(stack, "embedding")

    # 100 rows edited; their batches reach the provider (old model) and are held there.
    fake_openai.set_faults(hold_marker=HELD)
    before = fake_openai.stats()["requests"]
    with stack.connect() as conn:
        conn.execute("UPDATE docs SET body = body || %s WHERE id <= 100", (f" {HELD}",))
    wait_for(lambda: fake_openai.stats()["requests"] >= before + 4, timeout=30,
             message="four batches of the old model held at the provider")

    # The model changes in place while they wait; then the provider answers them.
    write_config(stack.config_path, docs_config().replace(f'"{OLD}"', f'"{NEW}"'))
    init = stack.cli("init")
    assert init.returncode == 0, init.stdout + init.stderr
    fake_openai.set_faults(hold_marker=None)

    wait_for(lambda: _settled(stack), timeout=60, interval=0.3,
             message="every row embedded by the new model for its current text")
    rows = _vectors(stack)
    old_model = [key for key, text, vector in rows
                 if np.allclose(vector, fake_vector(OLD, text, DIMS), atol=2e-3)]
    assert old_model == [], f"{len(old_model)} of {len(rows)} rows hold {OLD}'s vector"
    assert_column_current(stack, "embedding", NEW, DIMS)

    # The dropped vectors were billed: the ledger has them, under the model that billed them.
    with stack.connect() as conn:
        billed = dict(conn.execute("SELECT model, sum(inputs) FROM pgreembed.usage"
                                   " GROUP BY model").fetchall())
        tokens = conn.execute("SELECT sum(tokens) FROM pgreembed.usage").fetchone()
    assert billed[f"openai:{OLD}@{DIMS}"] >= 300 + 8, billed  # the fill + a held batch
    assert tokens is not None and tokens[0] == fake_openai.stats()["tokens_embedded"]


def test_a_vector_kept_through_an_outage_is_taken_only_for_the_model_that_made_it(
        redis_url: str) -> None:
    target = make_target("postgresql:///unused")
    made_by = Slot(id=1, target=target, vector_column="embedding", role="live", model_id=1,
                   model_key=f"openai:{OLD}@{DIMS}", provider="openai", model=OLD,
                   dimensions=DIMS, primary_key="id", pk_type="bigint")
    row = Row(7, "some text", uuid.uuid4())
    paid = PaidVectors(redis.Redis.from_url(redis_url))
    assert paid.keep(made_by, [Embedded(row, fake_vector(OLD, "some text", DIMS))], 5, set())

    assert len(paid.take(made_by, [row]).embedded) == 1  # the same model: taken
    changed_in_place = replace(made_by, model_id=2, model_key=f"openai:{NEW}@{DIMS}",
                               model=NEW)
    assert paid.take(changed_in_place, [row]).embedded == []
    # Even under the same registry id (a model row re-keyed by hand), the key is checked.
    assert paid.take(replace(made_by, model_key=f"openai:{NEW}@{DIMS}"), [row]).embedded == []
