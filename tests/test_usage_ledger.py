"""The usage ledger records the model that billed each batch, so a column's cost stays
right across an in-place model change (same column, another model of the same size)."""

from __future__ import annotations

import pytest

from pgreembed.config import load_settings
from pgreembed.embedding.pricing import PRICES_PER_MTOKEN
from pgreembed.observability.scheduler_metrics import DatabaseCollector
from tests.helpers import Stack, seed

SMALL, LARGE = "text-embedding-3-small", "text-embedding-3-large"


def use_model(stack: Stack, model: str) -> None:
    text = stack.config_path.read_text()
    for old in ("fake-384", SMALL):
        text = text.replace(f'model = "{old}"', f'model = "{model}"')
    stack.config_path.write_text(text)
    assert stack.cli("init").returncode == 0
    result = stack.cli("tick", "--wait", "--timeout", "60")
    assert result.returncode == 0, result.stdout + result.stderr


def test_cost_per_column_prices_each_models_tokens_at_its_own_price(stack: Stack) -> None:
    seed(stack, 30, body="some body text", numbered_body=False)
    stack.start_worker()
    use_model(stack, SMALL)
    use_model(stack, LARGE)  # in place: every row is re-embedded into the same column
    with stack.connect() as conn:
        billed = dict(conn.execute("SELECT model, sum(tokens) FROM pgreembed.usage"
                                   " GROUP BY model").fetchall())
    assert set(billed) == {f"openai:{SMALL}@384", f"openai:{LARGE}@384"}
    assert all(tokens > 0 for tokens in billed.values())

    families = {f.name: f for f in
                DatabaseCollector(load_settings(stack.config_path, stack.env)).collect()}
    cost = {s.labels["model"]: s.value for s in families["pgreembed_slot_cost_usd"].samples
            if s.name.endswith("_total")}
    for model, price in ((SMALL, PRICES_PER_MTOKEN[SMALL]), (LARGE, PRICES_PER_MTOKEN[LARGE])):
        key = f"openai:{model}@384"
        assert cost[key] == pytest.approx(float(billed[key]) / 1e6 * price)
