"""The steps a take-over from pgai shares whatever its destination (a chunk table, or a
column): pgai's own on/off switch, the wait for its batch in flight, and the refusal of a
vectorizer whose embedder pgreembed lacks."""

from __future__ import annotations

import time

from pgreembed.config import Target
from pgreembed.config.model_keys import is_foreign, missing_provider_reason
from pgreembed.errors import ImportRefused, MigrationError, NotInitializedError
from pgreembed.store import pgai_queue
from pgreembed.store.pgai_values import Vectorizer
from pgreembed.store.pool import connect
from pgreembed.store.slots import Slot
from pgreembed.store.takeover import Takeover


def refuse_foreign(vectorizer: str, target: Target) -> None:
    """A target adopted with a provider pgreembed lacks is never taken over: nothing could
    embed its new texts, so pgai's worker keeps serving it."""
    if is_foreign(target.provider):
        raise ImportRefused(f"cannot take over pgai vectorizer {vectorizer!r}: "
                            + missing_provider_reason(target.provider, target.model)
                            + "; nothing was changed")


def set_disabled(dsn: str, vec: Vectorizer, disabled: bool) -> None:
    with connect(dsn) as conn:
        pgai_queue.set_disabled(conn, vec, disabled)
        conn.commit()


def wait_for_pgai(dsn: str, vec: Vectorizer, wait: float) -> float:
    """Once the vectorizer is disabled pgai's worker starts no batch; wait (at most `wait`
    seconds) for the one in flight to commit. Otherwise the chunk stage would re-chunk
    parents that batch is rewriting, and wait on its row locks while holding the parents
    (app writes to them waited 3.5 s in a test). Meanwhile pgai's trigger still queues every
    write: nothing is lost, it is only not processed for that long. Returns seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < wait:
        with connect(dsn) as conn:
            held = pgai_queue.held_rows(conn, vec)
            conn.rollback()
        if not held:
            break
        time.sleep(0.2)  # pgai's batch is at its provider: poll, never wait on its locks
    return round(time.monotonic() - started, 3)


def require_taken(found: Takeover | None, target: Target, vectorizer: str) -> Takeover:
    """The registry's row of a take-over an undo can hand back."""
    if found is None or found.state != "taken":
        raise MigrationError(f"target {target.name!r} has not taken over pgai vectorizer"
                             f" {vectorizer!r}: nothing to undo")
    return found


def live_slot(slots: list[Slot], target: Target) -> Slot:
    """The target's live column, which the adoption made: a take-over needs it."""
    live = [s for s in slots if s.role == "live"]
    if not live:
        raise NotInitializedError(f"target {target.name!r} has no live column yet: run"
                                  " `pgreembed import-pgai --adopt` before --take-over")
    return live[0]
