"""The scheduler's part of the chunk stage: find dirty parents, send them to the workers.

Splitting (CPU, tokenizers) and applying run in the workers (the chunk_parents actor), so
they scale with them and the scheduler's pass stays a cheap walk of the marks' index.
A parent is claimed in Redis while its batch is out (the claims every row of a slot
gets), so it is never sent twice at once; its mark stays in Postgres until a worker has
applied its new chunk set, so a worker killed meanwhile loses nothing: the claim lapses
(or Dramatiq redelivers the batch) and the parent is sent again.
"""

from __future__ import annotations

import logging

import psycopg
import redis

from pgreembed.chunking.stage import (
    PARENTS_PER_PASS,
    PARENTS_PER_READ,
    chunk_sets,
    copy_vectors,
)
from pgreembed.config import Settings
from pgreembed.errors import PgreembedError
from pgreembed.queue.claims import chunk_claims
from pgreembed.queue.contract import ChunkSender
from pgreembed.store.chunk_sets import Mark, dirty_page
from pgreembed.store.chunks import parent_key
from pgreembed.store.rechunk_sets import ChunkSet

log = logging.getLogger(__name__)

PAGE = 500  # marks read a statement


class ChunkDispatch:
    """Sends each chunk set's dirty parents in batches of PARENTS_PER_READ."""

    def __init__(self, settings: Settings, client: redis.Redis, send: ChunkSender) -> None:
        self.settings = settings
        self.redis = client
        self.send = send

    def run(self, conn: psycopg.Connection, max_parents: int = PARENTS_PER_PASS) -> int:
        """One pass over every chunk set; returns the parents sent."""
        sent = 0
        for chunk_set in chunk_sets(conn, self.settings):
            try:
                sent += self._send_set(conn, chunk_set, max_parents)
                copy_vectors(conn, chunk_set)  # what the workers' batches left uncopied
            except (psycopg.Error, PgreembedError) as exc:
                conn.rollback()
                log.warning("chunk stage of %s: %s: %s", chunk_set.target.name,
                            type(exc).__name__, exc)
        return sent

    def _send_set(self, conn: psycopg.Connection, chunk_set: ChunkSet, budget: int) -> int:
        target = chunk_set.target
        claims = chunk_claims(self.redis, target.name, self.settings.lease_seconds)
        if expired := claims.expire_stale():
            log.warning("chunk set %s: %d parents' claims expired; sent again", target.name,
                        expired)
        sent = 0
        after: Mark | None = None
        key = parent_key(conn, target)
        while sent < budget:
            page = dirty_page(conn, target, key, after, PAGE)
            conn.commit()
            if not page:
                break
            after = page[-1]
            claimed = claims.claim([mark.text for mark in page[:budget - sent]])
            for start in range(0, len(claimed), PARENTS_PER_READ):
                batch = claimed[start:start + PARENTS_PER_READ]
                # A set that is not the live table's (a re-chunk's new set, or after its
                # swap the old one kept for a rollback) waits behind the live work.
                self.send(chunk_set.configured.name, target.name, batch,
                          chunk_set.copy_from is not None)
                claims.confirm(batch)  # if we die before this, the claims lapse in seconds
            sent += len(claimed)
            if len(page) < PAGE:
                break
        return sent
