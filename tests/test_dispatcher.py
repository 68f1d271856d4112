"""The dispatcher's promises, in-process: real Postgres and Redis, no broker, no workers.

`Dispatcher` takes its `send` (pgreembed.queue.contract.Sender); a recording sender
shows what one pass would put on the queue: at most the in-flight budget per slot,
batches of at most `batch_size`, a cursor that resumes after the last key sent and wraps
around at the end, nothing for rows already claimed in flight, nothing for a paused or
misconfigured slot, and messages of the queue contract's shape.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import psycopg
import pytest
import redis

from pgreembed.config import Settings, parse_settings
from pgreembed.queue.claims import InFlight
from pgreembed.queue.contract import ACTOR, QUEUE, batch_message
from pgreembed.store.setup import init_target
from pgreembed.store.slots import Slot, mark_misconfigured
from scheduler.dispatch import Dispatcher

ROWS = 100
BATCH = 8
BUDGET = 20  # worker.max_inflight_rows


@dataclass
class Recorder:
    """A Sender that keeps every batch instead of enqueueing it."""

    sent: list[tuple[str, int, list[str]]] = field(default_factory=list)

    backfill: list[bool] = field(default_factory=list)

    def __call__(self, target: str, slot_id: int, keys: list[str],
                 backfill: bool = False) -> None:
        self.sent.append((target, slot_id, keys))
        self.backfill.append(backfill)

    def take(self) -> list[int]:
        """The keys sent since the last call, in order, as ints."""
        keys = [int(k) for _, _, batch in self.sent for k in batch]
        self.sent.clear()
        return keys


@dataclass
class Setup:
    settings: Settings
    slot: Slot
    conn: psycopg.Connection
    redis: redis.Redis
    sender: Recorder

    def dispatcher(self, page_size: int = 1000) -> Dispatcher:
        return Dispatcher(self.settings, self.redis, self.sender, page_size)

    @property
    def inflight(self) -> InFlight:
        return InFlight(self.redis, self.slot.id, self.settings.lease_seconds)


@pytest.fixture
def setup(database_url: str, redis_url: str) -> Iterator[Setup]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE docs (id bigserial PRIMARY KEY, body text)")
        conn.execute("INSERT INTO docs (body) SELECT 'body ' || g"
                     " FROM generate_series(1, %s) g", (ROWS,))
    settings = parse_settings({
        "target": [{"name": "docs", "table": "public.docs", "text_column": "body",
                    "vector_column": "embedding", "provider": "openai", "model": "fake-384",
                    "dimensions": 384, "batch_size": BATCH}],
        "worker": {"max_inflight_rows": BUDGET}},
        {"DATABASE_URL": database_url, "REDIS_URL": redis_url})
    slot = init_target(database_url, settings.target("docs"))
    client = redis.Redis.from_url(redis_url)
    with psycopg.connect(database_url) as conn:
        yield Setup(settings, slot, conn, client, Recorder())


def test_a_pass_sends_at_most_the_budget_in_batches_of_the_contracts_shape(
        setup: Setup) -> None:
    report = setup.dispatcher().run_pass(setup.conn)
    sent = list(setup.sender.sent)
    assert [len(keys) for _, _, keys in sent] == [8, 8, 4]
    for target, slot_id, keys in sent:
        assert (target, slot_id) == ("docs", setup.slot.id)
        assert all(isinstance(k, str) for k in keys)  # keys travel as text
        message = batch_message(target, slot_id, keys)
        assert (message.queue_name, message.actor_name) == (QUEUE, ACTOR)
        assert message.args == ("docs", setup.slot.id, keys)
    assert setup.sender.take() == list(range(1, 21))
    assert (report.enqueued_rows, report.batches, report.complete) == (20, 3, False)
    assert report.per_target == {"docs": 20}
    assert setup.inflight.count() == BUDGET
    # The budget is spent while those rows are in flight: the next pass sends nothing.
    again = setup.dispatcher().run_pass(setup.conn)
    assert setup.sender.sent == [] and again.enqueued_rows == 0 and not again.complete


def test_the_cursor_resumes_after_the_last_key_and_wraps_around(setup: Setup) -> None:
    dispatcher = setup.dispatcher()
    passes = []
    for _ in range(7):
        dispatcher.run_pass(setup.conn)
        keys = setup.sender.take()
        passes.append(keys)
        # The workers finished (without writing: the rows stay pending, so only the
        # cursor decides what comes next).
        setup.inflight.release(str(k) for k in keys)
    assert passes[:5] == [list(range(start, start + 20)) for start in (1, 21, 41, 61, 81)]
    assert passes[5] == []  # past the last key: the sweep ends, the cursor is dropped
    assert passes[6] == list(range(1, 21))  # and the next pass starts from the first key


def test_rows_claimed_in_flight_are_not_sent_again(setup: Setup) -> None:
    setup.inflight.claim(["3", "50"])
    setup.inflight.confirm(["3", "50"])
    report = setup.dispatcher().run_pass(setup.conn)
    # The two claims count against the budget (18 left); row 3 is skipped, not sent, and
    # the pass takes one more row in its place.
    assert setup.sender.take() == [k for k in range(1, 20) if k != 3]
    assert report.skipped_in_flight == 1
    assert setup.inflight.count() == BUDGET
    # A tick (no budget) sweeps everything else, still skipping what is in flight.
    tick = setup.dispatcher().run_pass(setup.conn, limit_in_flight=False)
    assert setup.sender.take() == list(range(20, 50)) + list(range(51, ROWS + 1))
    assert tick.complete and tick.skipped_in_flight == 20


def test_pages_hold_whole_batches(setup: Setup) -> None:
    """Pages of 10 rows with batches of 8 would send 8 + 2 per page; the dispatcher
    rounds the page to whole batches instead."""
    setup.dispatcher(page_size=10).run_pass(setup.conn, limit_in_flight=False)
    sizes = [len(keys) for _, _, keys in setup.sender.sent]
    assert sizes == [BATCH] * (ROWS // BATCH) + [ROWS % BATCH]
    assert setup.sender.take() == list(range(1, ROWS + 1))


def test_a_paused_or_misconfigured_slot_sends_nothing(setup: Setup) -> None:
    setup.conn.execute("UPDATE pgreembed.slots SET paused = true WHERE id = %s",
                       (setup.slot.id,))
    setup.conn.commit()
    report = setup.dispatcher().run_pass(setup.conn, limit_in_flight=False)
    assert setup.sender.sent == [] and report.enqueued_rows == 0

    setup.conn.execute("UPDATE pgreembed.slots SET paused = false WHERE id = %s",
                       (setup.slot.id,))
    mark_misconfigured(setup.conn, setup.slot, "dimensions: the model has 384")
    setup.conn.commit()
    report = setup.dispatcher().run_pass(setup.conn, limit_in_flight=False)
    assert setup.sender.sent == [] and report.enqueued_rows == 0
    assert setup.inflight.count() == 0  # nothing claimed either
