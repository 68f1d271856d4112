"""The contract between the scheduler and the workers: which queue, which actor, what message.

The scheduler sends by these names and never imports worker/ (which declares the
actor under the same names): a message is `embed_batch(target, slot_id, keys)` on
queue `pgreembed`, the keys being the rows' primary keys as text, already claimed
in flight (pgreembed.queue.claims) by the sender. A batch of a column that is not live
(a migration's or a side fill's) is `embed_backfill_batch(target, slot_id, keys)` on
queue `pgreembed_backfill`: the same work, by an actor of a lower priority, so a
worker's next free thread takes the live column's batches first (Dramatiq orders the
messages it prefetched by their actor's priority; one queue would have kept a new
row's batch behind every migration batch already queued). A chunked target's dirty parents go as
`chunk_parents(target, chunk_set, keys)` on the same queue: the parents' keys as text,
claimed in the chunk set's own in-flight set (claims.chunk_claims); a re-chunk
migration's new set (every parent dirty at its start) as `chunk_backfill_parents` on
the backfill queue, at its priority.
"""

from __future__ import annotations

from typing import Protocol

import dramatiq

QUEUE = "pgreembed"
ACTOR = "embed_batch"
CHUNK_ACTOR = "chunk_parents"
BACKFILL_QUEUE = "pgreembed_backfill"
BACKFILL_ACTOR = "embed_backfill_batch"
BACKFILL_CHUNK_ACTOR = "chunk_backfill_parents"
BACKFILL_PRIORITY = 100  # Dramatiq: lower runs first; the live column's actor has 0


class Sender(Protocol):
    """send(target, slot_id, keys, backfill): put one batch on its queue (`backfill`: a
    column that is not live, on the backfill queue)."""

    def __call__(self, target: str, slot_id: int, keys: list[str],
                 backfill: bool = False) -> None: ...


class ChunkSender(Protocol):
    """send_chunks(target, chunk_set, keys, backfill): one batch of dirty parents to split
    and apply (`backfill`: a re-chunk migration's new set, on the backfill queue)."""

    def __call__(self, target: str, chunk_set: str, keys: list[str],
                 backfill: bool = False) -> None: ...


def batch_message(target: str, slot_id: int, keys: list[str], backfill: bool = False
                  ) -> dramatiq.Message:
    """One batch of one slot's rows, as the worker's actor takes it."""
    return dramatiq.Message(queue_name=BACKFILL_QUEUE if backfill else QUEUE,
                            actor_name=BACKFILL_ACTOR if backfill else ACTOR,
                            args=(target, slot_id, keys), kwargs={}, options={})


def broker_sender(broker: dramatiq.Broker) -> Sender:
    """A Sender that enqueues on `broker` by name (no actor needs to be declared here)."""

    def send(target: str, slot_id: int, keys: list[str], backfill: bool = False) -> None:
        broker.enqueue(batch_message(target, slot_id, keys, backfill))

    return send


def chunk_message(target: str, chunk_set: str, keys: list[str], backfill: bool = False
                  ) -> dramatiq.Message:
    """One batch of one chunk set's dirty parents, as the worker's actor takes it."""
    return dramatiq.Message(queue_name=BACKFILL_QUEUE if backfill else QUEUE,
                            actor_name=BACKFILL_CHUNK_ACTOR if backfill else CHUNK_ACTOR,
                            args=(target, chunk_set, keys), kwargs={}, options={})


def broker_chunk_sender(broker: dramatiq.Broker) -> ChunkSender:
    """A ChunkSender that enqueues on `broker` by name."""

    def send(target: str, chunk_set: str, keys: list[str], backfill: bool = False) -> None:
        broker.enqueue(chunk_message(target, chunk_set, keys, backfill))

    return send
