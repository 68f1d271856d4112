"""The OpenAI Batch API path for big migrations: half the price, results within 24 h.

`pgreembed migrate start --batch-api` registers the new column in "batch" mode:
the scheduler leaves it alone, and `pgreembed migrate batch` (run it from cron,
or with --wait) does the work in resumable steps, all recorded in Postgres:

1. submit: pending rows not yet in a job are written as JSONL request lines
   (<= 50,000 inputs per batch) with the md5 of the text each row had, uploaded,
   and a batch is created;
2. poll: open jobs are checked; a completed job's output is written with the same
   guarded UPDATE as the workers (a row edited since submission is not written), in
   slices of about `[worker] max_row_lock_ms` like theirs, so the app's rows are held
   briefly; per-line errors are recorded as row failures, and the tokens billed, in the
   transaction that marks the job "collecting" before its first slice; a step has the
   job to itself for COLLECTOR_LEASE_SECONDS, renewed at every slice (a step killed
   between slices leaves it to a later one once that runs out, which downloads the
   output again, writes only rows not written yet and counts nothing twice); only
   inputs the provider refused fail their rows; a job whose files are gone at the
   provider is marked "lost" and its rows go to the queue;
3. when no job is open, the column goes back to the normal queue, so the workers
   embed the stragglers (rows edited while their batch was running) before a swap.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import openai
import psycopg
import redis
from psycopg import sql
from psycopg.types.json import Jsonb

from pgreembed.config import Settings, Target
from pgreembed.config.model_keys import model_key
from pgreembed.embedding.embed import prepare
from pgreembed.embedding.paid import PaidVectors
from pgreembed.embedding.providers import make_provider
from pgreembed.embedding.providers.openai_provider import decode_vector
from pgreembed.errors import MigrationError, NotFoundError
from pgreembed.observability.redact import redact, register_secret
from pgreembed.store.pending import missing_page
from pgreembed.store.pool import connect
from pgreembed.store.rows import (
    load_pending,
    lock_slot,
    record_failures,
    record_usage,
    write_isolating,
)
from pgreembed.store.slots import Slot, load_slots
from pgreembed.store.versions import upgrade
from pgreembed.store.write_slices import WriteSlicer
from pgreembed.values import Embedded, Failed, Row

log = logging.getLogger(__name__)

MAX_INPUTS_PER_BATCH = 50_000
# One input per request line: a rejected line then names exactly one bad row (the
# Batch API bills tokens, not requests, so this costs nothing).
INPUTS_PER_LINE = 1


# "collecting": its output is being written in slices, its spend recorded (store.usage).
OPEN = ("preparing", "submitted", "collecting")


@dataclass(frozen=True)
class BatchStep:
    submitted_inputs: int
    completed_jobs: int
    written: int
    failed: int
    open_jobs: int
    back_to_queue: bool


def _client(settings: Settings) -> openai.OpenAI:
    register_secret(settings.openai_api_key)
    return openai.OpenAI(api_key=settings.openai_api_key or "unused",
                         base_url=settings.openai_base_url, max_retries=3,
                         timeout=settings.request_timeout)


def batch_slot(conn: psycopg.Connection, target: Target) -> Slot | None:
    return next((s for s in load_slots(conn, target) if s.mode == "batch"), None)


def submit(settings: Settings, conn: psycopg.Connection, slot: Slot,
           client: openai.OpenAI) -> int:
    """One new batch job for up to 50,000 pending rows not already in an open job."""
    keys: list[str] = []
    after: Any = None
    while len(keys) < MAX_INPUTS_PER_BATCH:
        page = missing_page(conn, slot, after, 5000)
        if not page:
            break
        after = page[-1]
        in_jobs = {r[0] for r in conn.execute(
            "SELECT r.pk FROM pgreembed.batch_job_rows r JOIN pgreembed.batch_jobs j"
            " ON j.id = r.job_id WHERE j.slot_id = %s AND j.status = ANY(%s)"
            " AND r.pk = ANY(%s)", (slot.id, list(OPEN), [str(k) for k in page]))}
        keys.extend(str(k) for k in page if str(k) not in in_jobs)
    keys = keys[:MAX_INPUTS_PER_BATCH]
    rows = load_pending(conn, slot, keys)
    conn.commit()  # counting tokens may download tiktoken's encoding: not in a transaction
    provider = make_provider(settings, slot.provider, slot.model, slot.dimensions, slot.target)
    ready, failed, _ = prepare(rows, provider, slot.target.truncate)
    record_failures(conn, slot, failed)
    if not ready:
        conn.commit()
        return 0
    row = conn.execute("INSERT INTO pgreembed.batch_jobs (slot_id, inputs, asked)"
                       " VALUES (%s, %s, %s) RETURNING id",
                       (slot.id, len(ready), Jsonb(_asked(slot)))).fetchone()
    assert row is not None
    job_id = int(row[0])
    lines: list[str] = []
    records: list[tuple[int, int, int, str, Any, int]] = []
    for line_no, start in enumerate(range(0, len(ready), INPUTS_PER_LINE)):
        chunk = ready[start:start + INPUTS_PER_LINE]
        body: dict[str, Any] = {**_asked(slot), "input": [text for _, text, _, _ in chunk],
                                "encoding_format": "base64"}
        lines.append(json.dumps({"custom_id": f"{job_id}-{line_no}", "method": "POST",
                                 "url": "/v1/embeddings", "body": body}))
        records.extend((job_id, line_no, i, str(r.pk), r.content_hash, tokens)
                       for i, (r, _, tokens, _) in enumerate(chunk))
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO pgreembed.batch_job_rows (job_id, line, position, pk,"
                        " content_hash, tokens) VALUES (%s, %s, %s, %s, %s, %s)", records)
    conn.commit()  # the job exists before anything is uploaded: a crash leaves 'preparing'
    upload = client.files.create(file=(f"pgreembed-{job_id}.jsonl",
                                       io.BytesIO("\n".join(lines).encode())), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/embeddings",
                                  completion_window="24h")
    conn.execute("UPDATE pgreembed.batch_jobs SET provider_batch_id = %s, status = 'submitted'"
                 " WHERE id = %s", (batch.id, job_id))
    conn.commit()
    log.info("batch job %d: %d inputs submitted as %s", job_id, len(ready), batch.id)
    return len(ready)


def _asked(slot: Slot) -> dict[str, Any]:
    """What a request line asks for to get `slot`'s model's vectors."""
    asked: dict[str, Any] = {"model": slot.model}
    if slot.model.startswith("text-embedding-3"):
        asked["dimensions"] = slot.dimensions
    return asked


def _made_by(client: openai.OpenAI, batch: Any) -> list[dict[str, Any]]:
    """What the job's request lines asked for (model, dimensions): the model that made its
    vectors, whatever the registry says by the time they are collected. Read from the
    input file for a job submitted before `batch_jobs.asked` recorded it."""
    asked = []
    for line in client.files.content(batch.input_file_id).text.splitlines():
        if line.strip():
            body = json.loads(line)["body"]
            found = {"model": body["model"]}
            if "dimensions" in body:
                found["dimensions"] = body["dimensions"]
            if found not in asked:
                asked.append(found)
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


def _download(client: openai.OpenAI, batch: Any) -> list[tuple[dict[str, Any], bool]]:
    """A completed job's output and error lines, (record, is_error). Called outside any
    transaction: an output file of 50,000 inputs is hundreds of MB, and a session idle in
    a transaction that long is ended by our idle-in-transaction limit (store.session)."""
    records: list[tuple[dict[str, Any], bool]] = []
    for file_id, is_error in ((batch.output_file_id, False), (batch.error_file_id, True)):
        if file_id:
            records.extend((json.loads(line), is_error) for line in
                           client.files.content(file_id).text.splitlines() if line.strip())
    return records


def collect(conn: psycopg.Connection, slot: Slot, job_id: int,
            records: Sequence[tuple[dict[str, Any], bool]], made_by: list[dict[str, Any]],
            paid: PaidVectors, slicer: WriteSlicer) -> tuple[int, int]:
    """Write a completed job's downloaded vectors (guarded); record rows with wrong vectors.

    Returns (written, failed); rows of lines that failed for no fault of theirs stay
    pending, and so do rows the app holds locked at the write (their vectors are kept in
    `paid` for the workers). The tokens billed commit first, with the job marked
    "collecting"; then the vectors, each slice in a transaction of its own (a whole job's
    50,000 rows in one held them for seconds). A job "collecting" already (an earlier step
    stopped between slices, or another step collects it now) has its tokens recorded:
    its rows already written by this model for their text are not written again."""
    embedded, failed, tokens_billed = _parse(_job_rows(conn, job_id), records, slot, job_id)
    current = lock_slot(conn, slot.target, slot.id, "ROW EXCLUSIVE")
    if current is None:
        raise NotFoundError(f"target {slot.target.name!r}: slot {slot.id} was dropped")
    # Claimed once: of two steps reading the job as submitted, the second waits here for
    # the first's commit and then records nothing.
    first = conn.execute("UPDATE pgreembed.batch_jobs SET status = 'collecting'"
                         " WHERE id = %s AND status = 'submitted'", (job_id,)).rowcount == 1
    if not _made_for(current, slot, made_by):
        # Not the column's model's vectors (invariant 7): billed, never written; the rows
        # stay pending and the workers embed them with the column's model.
        log.warning("batch job %d: made by %s, but column %s is %s now: its %d vectors are"
                    " dropped, their rows stay pending", job_id, made_by,
                    current.vector_column, current.model_key, len(embedded))
        billed_by = slot
        if len(made_by) == 1 and made_by != [_asked(slot)]:  # priced as the model it was
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
    return current.holds_vectors_of(slot) and made_by == [_asked(current)]


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
        column = (current.id, current.vector_column)
        piece, items = slicer.take(column, items)
        started = time.monotonic()
        done = write_isolating(conn, current, piece)
        slicer.observe(column, len(done.keys) + len(done.refused), time.monotonic() - started)
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


def _take_job(conn: psycopg.Connection, job_id: int) -> bool:
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


def step(settings: Settings, target: Target) -> BatchStep:
    """The first call submits every pending row (in jobs of <= 50,000 inputs); later
    calls poll and write finished jobs; when none is open, the column goes back to
    the queue so workers embed rows edited meanwhile."""
    client = _client(settings)
    paid = PaidVectors(redis.Redis.from_url(settings.redis_url))
    with connect(settings.database_url) as conn:
        upgrade(conn, repeatable=False)  # batch_jobs.asked (version 5), if init ran before
        conn.commit()
        slot = batch_slot(conn, target)
        if slot is None:
            raise MigrationError(f"target {target.name!r} has no column in batch mode"
                              " (migrate start --batch-api)")
        completed = written = failed = 0
        jobs = conn.execute(
            "SELECT id, provider_batch_id, asked FROM pgreembed.batch_jobs"
            " WHERE slot_id = %s AND status IN ('submitted', 'collecting') ORDER BY id",
            (slot.id,)).fetchall()
        conn.commit()  # never a transaction open across the provider's calls
        slicer = WriteSlicer(settings.max_row_lock_ms / 1000)
        for job_id, batch_id, asked in jobs:
            try:
                batch = client.batches.retrieve(batch_id)
                if batch.status in ("validating", "in_progress", "finalizing"):
                    continue
                if not _take_job(conn, job_id):  # another step is writing it
                    continue
                status: str = batch.status
                if status == "completed":
                    records = _download(client, batch)
                    made_by = [asked] if asked is not None else _made_by(client, batch)
                    w, f = collect(conn, slot, job_id, records, made_by, paid, slicer)
                    written, failed, completed = written + w, failed + f, completed + 1
                else:
                    log.warning("batch job %d ended %s; its rows stay pending", job_id,
                                status)
            except openai.NotFoundError as exc:  # deleted, or past the provider's keep
                conn.rollback()
                log.warning("batch job %d: the batch or its files are gone at the provider"
                            " (%s); its rows stay pending for the workers", job_id,
                            redact(str(exc)))
                status = "lost"
            conn.execute("UPDATE pgreembed.batch_jobs SET status = %s, finished_at = now(),"
                         " collector_until = NULL WHERE id = %s", (status, job_id))
            conn.commit()
        # A crash between recording a job and uploading it: forget that job.
        conn.execute("UPDATE pgreembed.batch_jobs SET status = 'abandoned' WHERE slot_id = %s"
                     " AND status = 'preparing' AND created_at < now() - interval '10 minutes'",
                     (slot.id,))
        submitted = 0
        first = conn.execute("SELECT NOT EXISTS (SELECT 1 FROM pgreembed.batch_jobs"
                             " WHERE slot_id = %s)", (slot.id,)).fetchone()
        if first and first[0]:
            while (count := submit(settings, conn, slot, client)) > 0:
                submitted += count
        open_row = conn.execute("SELECT count(*) FROM pgreembed.batch_jobs WHERE slot_id = %s"
                                " AND status = ANY(%s)", (slot.id, list(OPEN))).fetchone()
        open_jobs = int(open_row[0]) if open_row else 0
        back = open_jobs == 0
        if back:
            conn.execute("UPDATE pgreembed.slots SET mode = 'queue' WHERE id = %s", (slot.id,))
        conn.commit()
    return BatchStep(submitted, completed, written, failed, open_jobs, back)
