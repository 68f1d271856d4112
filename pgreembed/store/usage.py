"""The usage ledger's spend, and spend caps that hold with many workers: a batch reserves
its cost before it is sent.

Checking the ledger after the fact let every worker in flight pass the check at
once (a $0.0002 cap spent $0.0005). Instead, before its request a batch of a
capped migration reserves its estimated tokens, in one short transaction that
locks the migration's row, so reservations are taken one at a time:

- granted while the settled spend plus the open reservations is below the cap;
  so the cap is overshot by at most the one batch that crosses it;
- deferred while they reach it only through reservations of batches in flight
  (estimates are upper bounds: those may settle lower); the rows stay pending;
- refused once the settled spend reaches the cap: the migration is paused
  (`paused_by = 'spend_cap'`), its rows stay pending until `migrate resume
  --spend-cap` raises the cap;
- settled in the transaction that records the billed tokens in the usage ledger
  (the estimate is replaced by the bill, never counted twice or not at all);
- released when the provider call fails (nothing was billed). A reservation whose
  worker died expires after `RESERVATION_SECONDS`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg
from psycopg_pool import ConnectionPool

from pgreembed.store.slots import Slot

log = logging.getLogger(__name__)

# Longer than a batch can take (the actor's time limit is 15 minutes).
RESERVATION_SECONDS = 1800
SPEND_CAP = "spend_cap"  # pgreembed.slots.paused_by of a migration its cap paused


@dataclass
class Reservation:
    """A batch's share of its migration's spend cap (no id: the slot has no cap)."""

    pool: ConnectionPool | None
    id: int | None
    granted: bool

    def settle(self, conn: psycopg.Connection) -> None:
        """Call in the transaction that records the batch's billed tokens."""
        if self.id is not None:
            conn.execute("DELETE FROM pgreembed.spend_reservations WHERE id = %s", (self.id,))
            self.id = None

    def release(self) -> None:
        """Give the reservation back: the request failed, nothing was billed."""
        if self.id is not None and self.pool is not None:
            with self.pool.connection() as conn:
                conn.execute("DELETE FROM pgreembed.spend_reservations WHERE id = %s",
                             (self.id,))
            self.id = None

    @contextmanager
    def released_on_error(self) -> Iterator[None]:
        try:
            yield
        except BaseException:
            self.release()
            raise


def settle_ids(conn: psycopg.Connection, ids: set[int]) -> None:
    """Settle reservations by id, in the transaction that records their billed tokens:
    those of a batch whose earlier write attempts failed (its vectors were kept, see
    `pgreembed.embedding.paid`), which `Reservation.settle` no longer holds."""
    if ids:
        conn.execute("DELETE FROM pgreembed.spend_reservations WHERE id = ANY(%s)",
                     (sorted(ids),))


def reserve(pool: ConnectionPool, slot: Slot, estimate: Callable[[], int]) -> Reservation:
    """Reserve the batch's estimated cost against its migration's spend cap, if any.

    `estimate` gives the batch's tokens at most (`embedding.embed.estimate_tokens`); it is
    called only for a capped migration's column, as counting may run a tokenizer."""
    if slot.role != "next":  # only a migration's new column has a cap
        return Reservation(None, None, True)
    with pool.connection() as conn:
        return reserve_tokens(conn, slot, estimate(), pool)


def reserve_tokens(conn: psycopg.Connection, slot: Slot, tokens: int,
                   pool: ConnectionPool | None = None) -> Reservation:
    """One transaction: lock the migration's row, compare, then reserve or pause."""
    try:
        migration = conn.execute(
            "SELECT id, spend_cap_usd, price_per_mtoken FROM pgreembed.migrations"
            " WHERE to_slot = %s AND phase = 'filling' AND spend_cap_usd IS NOT NULL"
            " FOR UPDATE", (slot.id,)).fetchone()
        if migration is None:
            return Reservation(None, None, True)
        cap, price = float(migration[1]), float(migration[2] or 0)
        conn.execute("DELETE FROM pgreembed.spend_reservations"
                     " WHERE slot_id = %s AND expires_at < now()", (slot.id,))
        row = conn.execute(
            "SELECT (SELECT coalesce(sum(tokens), 0) FROM pgreembed.usage WHERE slot_id = %s),"
            " (SELECT coalesce(sum(tokens), 0) FROM pgreembed.spend_reservations"
            "  WHERE slot_id = %s)", (slot.id, slot.id)).fetchone()
        assert row is not None
        spent, reserved = int(row[0]) / 1e6 * price, int(row[1]) / 1e6 * price
        if spent >= cap:
            conn.execute("UPDATE pgreembed.slots SET paused = true, paused_by = %s"
                         " WHERE id = %s AND NOT paused AND role = 'next'", (SPEND_CAP, slot.id))
            conn.commit()
            log.warning("migration %d of %s paused by its $%.6f spend cap: $%.6f spent,"
                        " $%.6f reserved by batches in flight (raise it: migrate resume"
                        " --spend-cap USD)", migration[0], slot.target.name, cap, spent,
                        reserved)
            return Reservation(None, None, False)
        if spent + reserved >= cap:
            # Batches in flight may settle below their estimates (an upper bound):
            # not paused; this batch's rows stay pending and come back next pass.
            conn.commit()
            log.info("migration %d of %s: batch deferred, $%.6f spent + $%.6f reserved by"
                     " batches in flight reach the $%.6f cap", migration[0],
                     slot.target.name, spent, reserved, cap)
            return Reservation(None, None, False)
        found = conn.execute(
            "INSERT INTO pgreembed.spend_reservations (slot_id, tokens, expires_at)"
            " VALUES (%s, %s, now() + make_interval(secs => %s)) RETURNING id",
            (slot.id, tokens, RESERVATION_SECONDS)).fetchone()
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    assert found is not None
    return Reservation(pool, int(found[0]), True)


def spend(conn: psycopg.Connection, slot_id: int) -> tuple[int, float, float | None]:
    """(tokens sent, USD spent, USD cap) for the migration filling `slot_id`."""
    row = conn.execute(
        """
        SELECT coalesce((SELECT sum(tokens) FROM pgreembed.usage WHERE slot_id = %s), 0),
               m.price_per_mtoken, m.spend_cap_usd
        FROM pgreembed.migrations m WHERE m.to_slot = %s ORDER BY m.id DESC LIMIT 1
        """, (slot_id, slot_id)).fetchone()
    if row is None:
        return 0, 0.0, None
    tokens = int(row[0])
    price = float(row[1] or 0)
    return tokens, tokens / 1e6 * price, None if row[2] is None else float(row[2])


def migration_spend(conn: psycopg.Connection) -> list[tuple[int, float, float | None]]:
    """(new column's slot, USD spent, USD cap) of each migration still filling."""
    slots = [r[0] for r in conn.execute(
        "SELECT to_slot FROM pgreembed.migrations WHERE phase = 'filling'")]
    return [(slot_id, *spend(conn, slot_id)[1:]) for slot_id in slots]


def usage_by_model(conn: psycopg.Connection) -> dict[int, dict[str | None, float]]:
    """Tokens per slot and per model that billed them (None: rows from before the
    ledger recorded the model, priced as the slot's model)."""
    out: dict[int, dict[str | None, float]] = {}
    for slot_id, model, used in conn.execute(
            "SELECT slot_id, model, sum(tokens) FROM pgreembed.usage GROUP BY 1, 2"):
        out.setdefault(slot_id, {})[model] = float(used or 0)
    return out


def enforce_spend_cap(conn: psycopg.Connection, slot: Slot) -> bool:
    """Pause a filling migration whose spend reached its cap; True if it is paused now.

    Under the migration row's lock, as `migrate pause`: a swap takes it before making the
    column live (and unpaused), so the phase checked here is the phase at our commit and
    a column that became live meanwhile is never paused."""
    if slot.role != "next":
        return False
    _, spent, cap = spend(conn, slot.id)
    if cap is None or spent < cap:
        return False
    filling = conn.execute("SELECT 1 FROM pgreembed.migrations WHERE to_slot = %s"
                           " AND phase = 'filling' FOR UPDATE", (slot.id,)).fetchone()
    paused = filling is not None and conn.execute(
        "UPDATE pgreembed.slots SET paused = true, paused_by = %s WHERE id = %s"
        " AND role = 'next'", (SPEND_CAP, slot.id)).rowcount > 0
    conn.commit()
    if not paused:
        return False
    log.warning("migration of %s paused: spent $%.4f of its $%.4f cap (raise it: migrate"
                " resume --spend-cap USD)", slot.target.name, spent, cap)
    return True


def inputs_and_reused(conn: psycopg.Connection, slot_id: int) -> tuple[int, int]:
    """(rows written with a vector the provider billed, rows given an identical text's
    vector for free) for a slot, from the usage ledger (one row per batch)."""
    row = conn.execute("SELECT coalesce(sum(inputs), 0), coalesce(sum(reused), 0)"
                       " FROM pgreembed.usage WHERE slot_id = %s", (slot_id,)).fetchone()
    return (0, 0) if row is None else (int(row[0]), int(row[1]))
