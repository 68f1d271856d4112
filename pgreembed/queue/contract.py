"""The contract between the scheduler and the workers: which queue, which actor, what message.

The scheduler sends by these names and never imports worker/ (which declares the
actor under the same names): a message is `embed_batch(target, slot_id, keys)` on
queue `pgreembed`, the keys being the rows' primary keys as text, already claimed
in flight (pgreembed.queue.claims) by the sender.
"""

from __future__ import annotations

from collections.abc import Callable

import dramatiq

QUEUE = "pgreembed"
ACTOR = "embed_batch"

# send(target, slot_id, keys): put one batch on the queue.
Sender = Callable[[str, int, list[str]], None]


def batch_message(target: str, slot_id: int, keys: list[str]) -> dramatiq.Message:
    """One batch of one slot's rows, as the worker's actor takes it."""
    return dramatiq.Message(queue_name=QUEUE, actor_name=ACTOR, args=(target, slot_id, keys),
                            kwargs={}, options={})


def broker_sender(broker: dramatiq.Broker) -> Sender:
    """A Sender that enqueues on `broker` by name (no actor needs to be declared here)."""

    def send(target: str, slot_id: int, keys: list[str]) -> None:
        broker.enqueue(batch_message(target, slot_id, keys))

    return send
