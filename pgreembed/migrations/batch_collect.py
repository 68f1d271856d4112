"""Writing a finished Batch API job's vectors (migrations.batch_api's step 2): in slices
of `[worker] max_row_lock_ms`, each in its own transaction, as the workers write theirs,
so the app's rows are held briefly; the job's failures and billed tokens first, with
the job marked "collecting". One step at a time writes a job (a lease in its row,
renewed at every slice: a pooler in transaction mode cannot strand it); a step killed
between slices leaves the job to a later one once the lease ends, which downloads the
output again, writes only rows not written yet and counts nothing twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import psycopg
from psycopg import sql

from pgreembed.config.model_keys import model_key
from pgreembed.embedding.paid import PaidVectors
from pgreembed.embedding.providers.openai_provider import decode_vector
from pgreembed.errors import NotFoundError
from pgreembed.observability.redact import redact
from pgreembed.store.rows import lock_slot, record_failures, record_usage, write_isolating
from pgreembed.store.slots import Slot
from pgreembed.store.write_slices import WriteSlicer, column_of, slice_cost
from pgreembed.values import Embedded, Failed, Row

log = logging.getLogger(__name__)


def asked_for(slot: Slot) -> dict[str, Any]:
    """What a request line asks for to get `slot`'s model's vectors."""
    asked: dict[str, Any] = {"model": slot.model}
    if slot.model.startswith("text-embedding-3"):
        asked["dimensions"] = slot.dimensions
    return asked


def _job_rows(conn: psycopg.Connection, job_id: int
              ) -> dict[int, list[tuple[str, Any, int]]]:
    """The job's rows by request line, in their position order: (key, text hash, tokens)."""
    by_line: dict[int, list[tuple[str, Any, int]]] = {}
    for line, pk, content_hash, tokens in conn.execute(
            "SELECT line, pk, content_hash, tokens FROM pgreembed.batch_job_rows"
            " WHERE job_id = %s ORDER BY line, position", (job_id,)):
        by_line.setdefault(line, []).append((pk, content_hash, tokens))
    conn.commit()  # parsing 50,000 lines must not hold a transaction open
    return by_line


def collect(conn: psycopg.Connection, slot: Slot, job_id: int,
            records: Sequence[tuple[dict[str, Any], bool]], made_by: list[dict[str, Any]],
            paid: PaidVectors, slicer: WriteSlicer) -> tuple[int, int]:
    """Write a completed job's downloaded vectors (guarded); record rows with wrong vectors.

    Returns (written, failed); rows of lines that failed for no fault of theirs stay
    pending, and so do rows the app holds locked at the write (their vectors are kept in
    `paid` for the workers). The tokens billed commit first, with the job marked
    "collecting"; then the vectors, each slice in a transaction of its own (a whole job's
    50,000 rows in one held them for seconds). A job "collecting" already (an earlier step
    stopped between slices) has its tokens recorded: its rows already written by this
    model for their text are not written again. The caller holds the job's lease
    (`take_job`)."""
    embedded, failed, tokens_billed = _parse(_job_rows(conn, job_id), records, slot, job_id)
    current = lock_slot(conn, slot.target, slot.id, "ROW EXCLUSIVE")
    if current is None:
        raise NotFoundError(f"target {slot.target.name!r}: slot {slot.id} was dropped")
    # The step that takes it from "submitted" records its spend and failures; a later
    # step (the lease of one killed between slices ended) resumes it.
    first = conn.execute("UPDATE pgreembed.batch_jobs SET status = 'collecting'"
                         " WHERE id = %s AND status = 'submitted'", (job_id,)).rowcount == 1
    if not _made_for(current, slot, made_by):
        # Not the column's model's vectors (invariant 7): billed, never written; the rows
        # stay pending and the workers embed them with the column's model.
        log.warning("batch job %d: made by %s, but column %s is %s now: its %d vectors are"
                    " dropped, their rows stay pending", job_id, made_by,
                    current.vector_column, current.model_key, len(embedded))
        billed_by = slot
        if len(made_by) == 1 and made_by != [asked_for(slot)]:  # priced as the model it was
            asked = made_by[0]
            billed_by = replace(slot, model=asked["model"], model_key=model_key(
                slot.provider, asked["model"], asked.get("dimensions", slot.dimensions)))
        if first:
            record_usage(conn, billed_by, len(embedded), tokens_billed)
        conn.commit()
        return 0, 0
    if first:
        _record_failures_by_key(conn, slot, failed)
        record_usage(conn, slot, len(embedded), tokens_billed)
    else:  # recorded by the step that claimed it
        failed = []
        embedded = _not_written_yet(conn, current, embedded)
    conn.commit()
    written, refused = _write_slices(conn, slot, job_id, embedded, made_by, paid, slicer)
    return written, len(failed) + refused


def _parse(rows: dict[int, list[tuple[str, Any, int]]],
           records: Sequence[tuple[dict[str, Any], bool]], slot: Slot, job_id: int
           ) -> tuple[list[Embedded], list[Failed], int]:
    """A job's output and error lines as (vectors of the right size, rows at fault, tokens
    billed). A line the provider refused for the input (400, 413, 422) fails its row;
    any other error (a key, a model, a rate limit, a server error, the batch's expiry)
    is no row's fault: its rows stay pending, for the workers after the hand-back."""
    embedded: list[Embedded] = []
    failed: list[Failed] = []
    tokens_billed = 0
    for record, is_error in records:
        line_no = int(record["custom_id"].split("-")[1])
        members = rows.get(line_no, [])
        response = record.get("response") or {}
        status = response.get("status_code")
        if is_error or status != 200:
            message = redact(str((response.get("body") or {}).get("error", {}).get(
                "message") or record.get("error")))
            if len(members) == 1 and _input_refused(status):
                pk, h, _ = members[0]
                failed.append(Failed(Row(pk, None, h), f"batch API rejected it: {message}"))
            else:  # the queue path (after hand-back) embeds them, isolating a bad row
                log.warning("batch job %d line %d not embedded (%s, %s); its rows go to the"
                            " queue", job_id, line_no, status, message)
            continue
        data = sorted(response["body"]["data"], key=lambda d: d["index"])
        usage = response["body"].get("usage") or {}
        tokens_billed += usage.get("prompt_tokens") or sum(t for _, _, t in members)
        for (pk, h, _), item in zip(members, data, strict=True):
            vector = decode_vector(item["embedding"])
            if vector.shape != (slot.dimensions,):
                reason = (f"provider returned {vector.size} dimensions,"
                          f" expected {slot.dimensions}")
                failed.append(Failed(Row(pk, None, h), reason))
            else:
                embedded.append(Embedded(Row(pk, None, h), vector, False))
    return embedded, failed, tokens_billed


def _input_refused(status: object) -> bool:
    """An error line's HTTP status that says the input itself was refused (not a key, a
    model, a limit: 401, 403, 404, 408, 429 are nobody's row's fault)."""
    return status in (400, 413, 422)


def _made_for(current: Slot, slot: Slot, made_by: list[dict[str, Any]]) -> bool:
    """Whether the job's vectors are the column's model's now (invariant 7)."""
    return current.holds_vectors_of(slot) and made_by == [asked_for(current)]


def _not_written_yet(conn: psycopg.Connection, slot: Slot, embedded: list[Embedded]
                     ) -> list[Embedded]:
    """Of a resumed job's vectors, those whose row the state table does not already say
    this model wrote, or the app's table refused, for the same text (by the step that
    stopped)."""
    if not embedded:
        return embedded
    done = {row[0] for row in conn.execute(sql.SQL(
        "SELECT k.pk FROM unnest(%s::text[], %s::uuid[]) AS k(pk, hash) JOIN {state} s"
        " ON s.pgr_pk = k.pk::{pk_type} AND (s.pgr_hash = k.hash AND s.pgr_model_id = %s"
        " OR s.pgr_failed_hash = k.hash)"
    ).format(state=slot.state_table, pk_type=slot.pk_cast),
        ([str(e.row.pk) for e in embedded], [e.row.content_hash for e in embedded],
         slot.model_id))}
    return [e for e in embedded if str(e.row.pk) not in done]


def _write_slices(conn: psycopg.Connection, slot: Slot, job_id: int, items: list[Embedded],
                  made_by: list[dict[str, Any]], paid: PaidVectors, slicer: WriteSlicer
                  ) -> tuple[int, int]:
    """The job's vectors, each slice in a transaction of its own that locks the table and
    reads the slot again (a swap may rename the columns between slices; a model change
    leaves the rest pending); (rows written, rows the app's table refused: recorded)."""
    written = refused = 0
    while items:
        current = lock_slot(conn, slot.target, slot.id, "ROW EXCLUSIVE")
        if current is None or not _made_for(current, slot, made_by):
            log.warning("batch job %d: the column was dropped or its model changed while"
                        " its vectors were written: %d rows stay pending", job_id, len(items))
            conn.commit()
            break
        _renew_job(conn, job_id)
        column = column_of(current)
        piece, items = slicer.take(column, items)
        started = time.monotonic()
        done = write_isolating(conn, current, piece)
        slicer.observe(column, slice_cost(done), time.monotonic() - started)
        _record_failures_by_key(conn, current, done.refused)
        if done.busy:  # the app holds them: the workers write them after hand-back
            paid.keep(current, done.busy, 0, set(), recorded=True)
        conn.commit()
        written, refused = written + len(done.keys), refused + len(done.refused)
    return written, refused


def _record_failures_by_key(conn: psycopg.Connection, slot: Slot, failed: Sequence[Failed]
                            ) -> None:
    """Batch rows carry keys as text: cast them back to the key type for the state table."""
    if not failed:
        return
    query = sql.SQL("SELECT k, k::{} FROM unnest(%s::text[]) k").format(slot.pk_cast)
    typed: dict[str, Any] = dict(conn.execute(query, ([f.row.pk for f in failed],)).fetchall())
    record_failures(conn, slot, [Failed(Row(typed[f.row.pk], None, f.row.content_hash),
                                        f.reason) for f in failed])


# How long a step has a finished job to itself, renewed at every slice: a step killed
# while writing a job leaves it to the next step once this runs out.
COLLECTOR_LEASE_SECONDS = 600


def take_job(conn: psycopg.Connection, job_id: int) -> bool:
    """Whether this step now has the job to itself (never waits): two steps that found
    the same finished job, cron's and a `--wait`, would both write all its rows. A lease
    in the job's row, not a session lock, so a pooler in transaction mode is no trap."""
    # SKIP LOCKED: the writing step renews its lease in each slice's transaction.
    row = conn.execute(
        "UPDATE pgreembed.batch_jobs SET collector_until = now() + make_interval(secs => %s)"
        " WHERE id = (SELECT id FROM pgreembed.batch_jobs WHERE id = %s AND"
        " (collector_until IS NULL OR collector_until < now()) FOR UPDATE SKIP LOCKED)"
        " RETURNING id", (COLLECTOR_LEASE_SECONDS, job_id)).fetchone()
    conn.commit()
    if row is None:
        log.info("batch job %d: another step is writing it; a step killed while writing"
                 " it leaves it to the next once its lease ends (at most %d s)", job_id,
                 COLLECTOR_LEASE_SECONDS)
    return row is not None


def _renew_job(conn: psycopg.Connection, job_id: int) -> None:
    """In a slice's transaction: the job stays this step's while it writes."""
    conn.execute("UPDATE pgreembed.batch_jobs SET collector_until = now()"
                 " + make_interval(secs => %s) WHERE id = %s", (COLLECTOR_LEASE_SECONDS, job_id))
