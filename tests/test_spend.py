"""Spend caps with real workers: reserved before sending, so the cap holds under
concurrency, and `migrate resume --spend-cap` raises (or removes) it."""

from __future__ import annotations

import json

from pgreembed.embedding.pricing import PRICES_PER_MTOKEN
from tests.helpers import (
    Stack,
    assert_column_current,
    docs_config,
    seed,
    start_migration,
    wait_filled,
    wait_for,
)

MODEL = "text-embedding-3-small"
PRICE = PRICES_PER_MTOKEN[MODEL] / 1e6  # USD per token


def status(stack: Stack) -> dict[str, object]:
    result = stack.cli("migrate", "status", "--target", "docs", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    info: dict[str, object] = json.loads(result.stdout)
    return info


def ledger(stack: Stack, slot_id: int) -> tuple[float, float, int]:
    """(USD spent, USD of the costliest batch, open reservations) of the new column."""
    with stack.connect() as conn:
        tokens, biggest = conn.execute(
            "SELECT coalesce(sum(tokens), 0), coalesce(max(tokens), 0) FROM pgreembed.usage"
            " WHERE slot_id = %s", (slot_id,)).fetchone() or (0, 0)
        open_reservations = conn.execute(
            "SELECT count(*) FROM pgreembed.spend_reservations").fetchone()
    assert open_reservations is not None
    return int(tokens) * PRICE, int(biggest) * PRICE, int(open_reservations[0])


def wait_paused_by_cap(stack: Stack, slot_id: int) -> None:
    """Paused by the cap, and the batches in flight then billed (no reservation open)."""
    wait_for(lambda: status(stack)["paused_by"] == "spend_cap", timeout=60, interval=0.3,
             message="the spend cap to pause the migration")
    wait_for(lambda: ledger(stack, slot_id)[2] == 0, timeout=30, interval=0.2,
             message="the batches in flight when it paused to be billed")


def test_cap_holds_with_concurrent_workers_and_resume_raises_it(stack: Stack,
                                                                fake_openai) -> None:
    seed(stack, 400)
    stack.config_path.write_text(docs_config(batch_size=8, max_inflight_rows=256))
    assert stack.cli("init").returncode == 0
    stack.start_worker(processes=2, threads=4)  # 8 batches in flight at once
    stack.start_scheduler()
    wait_filled(stack, "embedding")
    fake_openai.set_faults(latency=0.3)  # every request overlaps the others
    # "doc N\nbody N" is ~4 tokens to the server: a batch of 8 rows costs ~$6e-7.
    cap = 0.000003
    column = start_migration(stack, "--model", MODEL, "--dimensions", "384",
                             "--spend-cap", str(cap))
    with stack.connect() as conn:
        slot = conn.execute("SELECT id FROM pgreembed.slots WHERE vector_column = %s",
                            (column,)).fetchone()
    assert slot is not None
    slot_id = int(slot[0])

    wait_paused_by_cap(stack, slot_id)
    spent, batch_cost, reservations = ledger(stack, slot_id)
    print(f"\nspend cap ${cap}: spent ${spent:.7f}, one batch ${batch_cost:.7f}")
    assert 0 < batch_cost < cap / 3  # several batches fit: the cap is what stops them
    assert cap <= spent <= cap + batch_cost, (spent, cap, batch_cost)
    assert reservations == 0
    assert status(stack)["done"] < 400

    # A plain resume would pause again at once: refused, saying how to raise the cap.
    refused = stack.cli("migrate", "resume", "--target", "docs")
    assert refused.returncode != 0
    assert "--spend-cap" in refused.stderr and "paused by its spend cap" in refused.stderr
    assert status(stack)["paused"] is True
    too_low = stack.cli("migrate", "resume", "--target", "docs", "--spend-cap", str(cap / 2))
    assert too_low.returncode != 0 and "not above" in too_low.stderr

    # A raised cap really resumes, and holds again.
    raised = 2 * cap
    resumed = stack.cli("migrate", "resume", "--target", "docs", "--spend-cap", str(raised))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert status(stack)["spend_cap_usd"] == raised
    wait_paused_by_cap(stack, slot_id)
    spent_again, batch_cost, _ = ledger(stack, slot_id)
    assert spent < spent_again, "resume --spend-cap did not resume filling"
    assert raised <= spent_again <= raised + batch_cost, (spent_again, raised, batch_cost)

    # No cap: filling continues to completion.
    removed = stack.cli("migrate", "resume", "--target", "docs", "--spend-cap", "none")
    assert removed.returncode == 0, removed.stdout + removed.stderr
    fake_openai.set_faults(latency=0.0)
    wait_filled(stack, column)
    final = status(stack)
    assert final["done"] == 400 and final["paused"] is False
    assert final["spend_cap_usd"] is None
    assert ledger(stack, slot_id)[2] == 0
    assert_column_current(stack, column, MODEL, 384)
