"""The contract between the scheduler and the workers: which queue, which actor, what message.

The scheduler sends by these names and never imports worker/ (which declares the
actor under the same names): a message is `embed_batch(target, slot_id, keys)` on
queue `pgreembed`, the keys being the rows' primary keys as text, already claimed
in flight (pgreembed.queue.claims) by the sender. A chunked target's dirty parents go as
`chunk_parents(target, chunk_set, keys)` on the same queue: the parents' keys as text,
claimed in the chunk set's own in-flight set (claims.chunk_claims).
"""

from __future__ import annotations

from collections.abc import Callable

import dramatiq

QUEUE = "pgreembed"
ACTOR = "embed_batch"
CHUNK_ACTOR = "chunk_parents"

# send(target, slot_id, keys): put one batch on the queue.
Sender = Callable[[str, int, list[str]], None]


# send_chunks(target, chunk_set, keys): one batch of dirty parents to split and apply.
ChunkSender = Callable[[str, str, list[str]], None]


def batch_message(target: str, slot_id: int, keys: list[str]) -> dramatiq.Message:
    """One batch of one slot's rows, as the worker's actor takes it."""
    return dramatiq.Message(queue_name=QUEUE, actor_name=ACTOR, args=(target, slot_id, keys),
                            kwargs={}, options={})


def broker_sender(broker: dramatiq.Broker) -> Sender:
    """A Sender that enqueues on `broker` by name (no actor needs to be declared here)."""

    def send(target: str, slot_id: int, keys: list[str]) -> None:
        broker.enqueue(batch_message(target, slot_id, keys))

    return send


def broker_chunk_sender(broker: dramatiq.Broker) -> ChunkSender:
    """A ChunkSender that enqueues `chunk_parents` on `broker` by name."""

    def send(target: str, chunk_set: str, keys: list[str]) -> None:
        broker.enqueue(dramatiq.Message(queue_name=QUEUE, actor_name=CHUNK_ACTOR,
                                        args=(target, chunk_set, keys), kwargs={},
                                        options={}))

    return send
