"""The measure the live-traffic tests assert with can fail: `app_transactions` counts an
app transaction held by another session's row lock, and names that session."""

from __future__ import annotations

import time

import psycopg

from tests.app_side import HELD, app_transactions
from tests.helpers import Stack, seed, wait_for


def test_a_row_lock_held_past_the_bound_is_counted_with_its_holder(stack: Stack) -> None:
    seed(stack, 16)
    with app_transactions(stack.dsn, range(1, 17)) as transactions:
        wait_for(lambda: transactions.done >= 4, timeout=30, message="app transactions")
        with psycopg.connect(stack.dsn, application_name="pgreembed-worker") as holder:
            # Three of share 0's four rows (keys 4, 8, 12, 16), never waiting on the app
            # (as our writes lock): each of its two-row transactions meets one of them.
            while len(holder.execute("SELECT FROM docs WHERE id IN (4, 8, 12, 16)"
                                     " FOR NO KEY UPDATE SKIP LOCKED").fetchall()) < 3:
                holder.rollback()
                time.sleep(0.05)
            time.sleep(5 * HELD)
        wait_for(lambda: transactions.done >= 8, timeout=30, message="app transactions")
    assert transactions.errors == [], transactions
    assert transactions.held and max(transactions.held) >= 2 * HELD, transactions
    assert transactions.blockers == {"pgreembed-worker"}, transactions
