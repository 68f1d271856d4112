"""Derived migrations: a shorter column made from the live vectors, no provider call
(issue 16.2), through the usual index / swap / rollback under a concurrent writer."""

from __future__ import annotations

import json
import random
import threading

from pgreembed.testing.fake_openai import FakeOpenAIServer
from tests.helpers import (
    Stack,
    assert_column_current,
    column_type,
    migrate,
    running,
    seed,
    wait_filled,
)


class Writer:
    """The app meanwhile: inserts rows and edits texts until stopped."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.stop = threading.Event()
        self.writes = 0
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        rng = random.Random(16)
        with self.stack.connect() as conn:
            while not self.stop.is_set():
                if rng.random() < 0.5:
                    conn.execute("INSERT INTO docs (title, body) VALUES ('new', %s)",
                                 (f"written meanwhile {self.writes}",))
                else:
                    conn.execute("UPDATE docs SET body = %s WHERE id = %s",
                                 (f"edited {self.writes}", rng.randint(1, 200)))
                self.writes += 1
                self.stop.wait(0.02)

    def __enter__(self) -> Writer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)


def test_derived_dimensions_cost_nothing_and_are_what_the_provider_returns(
        stack: Stack, fake_openai: FakeOpenAIServer) -> None:
    seed(stack, 200)
    running(stack)
    wait_filled(stack, "embedding")

    plan = stack.cli("migrate", "plan", "--target", "docs", "--derive", "dimensions:128",
                     "--json")
    assert plan.returncode == 0, plan.stderr
    planned = json.loads(plan.stdout)
    assert (planned["cost_usd"], planned["provider_inputs"]) == (0.0, 0)
    assert planned["column_type"] == "vector(128)"
    assert planned["storage_saved_bytes"] == 200 * (384 - 128) * 4

    fake_openai.reset()
    out = migrate(stack, "start", "--derive", "dimensions:128")
    new_column = out.split("column ")[1].split(" ")[0]
    assert fake_openai.stats()["requests"] == 0  # filled in SQL
    assert column_type(stack, new_column) == "vector(128)"
    # The provider's own vector at dimensions=128, for every row.
    assert_column_current(stack, new_column, "fake-384", 128)
    with stack.connect() as conn:
        assert conn.execute("SELECT m.key, g.derived FROM pgreembed.migrations g JOIN"
                            " pgreembed.slots s ON s.id = g.to_slot JOIN pgreembed.models m"
                            " ON m.id = s.model_id").fetchone() == (
            "openai:fake-384@128", "dimensions:128 of openai:fake-384@384")

    with Writer(stack) as writer:  # later rows: embedded by the provider at 128
        migrate(stack, "index")
        migrate(stack, "swap", "--max-unsearchable", "1000")
        assert column_type(stack, "embedding") == "vector(128)"
        migrate(stack, "rollback")
        assert column_type(stack, "embedding") == "vector(384)"
    assert writer.writes > 20
    wait_filled(stack, "embedding")
    wait_filled(stack, new_column)
    assert_column_current(stack, "embedding", "fake-384", 384)
    assert_column_current(stack, new_column, "fake-384", 128)


def test_derive_is_refused_for_a_size_it_cannot_shorten_to(stack: Stack) -> None:
    seed(stack, 3)
    assert stack.cli("init").returncode == 0
    for spec, reason in (("dimensions:384", "must be below the live column's 384"),
                         ("binary", "binary (bit) columns are not implemented"),
                         ("halfvec:1", "supported are dimensions:D and halfvec")):
        result = stack.cli("migrate", "start", "--target", "docs", "--derive", spec)
        assert result.returncode != 0
        assert reason in result.stderr
