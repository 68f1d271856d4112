"""The OpenAI Batch API path for big migrations: half the price, results within 24 h.

`pgreembed migrate start --batch-api` registers the new column in "batch" mode:
the scheduler leaves it alone, and `pgreembed migrate batch` (run it from cron,
or with --wait) does the work in resumable steps, all recorded in Postgres:

1. submit: pending rows not yet in a job are written as JSONL request lines
   (<= 50,000 inputs per batch) with the md5 of the text each row had, uploaded,
   and a batch is created;
2. poll: open jobs are checked; a completed job's output is written with the same
   guarded UPDATE as the workers (a row edited since submission is not written), in
   slices, by one step at a time, resumably (migrations.batch_collect); only inputs the
   provider refused fail their rows; a job whose files are gone at the provider is
   marked "lost" and its rows go to the queue;
3. when no job is open, the column goes back to the normal queue, so the workers
   embed the stragglers (rows edited while their batch was running) before a swap.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from typing import Any

import openai
import psycopg
import redis
from psycopg.types.json import Jsonb

from pgreembed.config import Settings, Target
from pgreembed.embedding.embed import prepare, too_long_advice
from pgreembed.embedding.paid import PaidVectors
from pgreembed.embedding.providers import make_provider
from pgreembed.errors import MigrationError
from pgreembed.migrations.batch_collect import asked_for, collect, take_job
from pgreembed.observability.redact import redact, register_secret
from pgreembed.store.pending import missing_page
from pgreembed.store.pool import connect
from pgreembed.store.rows import load_pending, record_failures
from pgreembed.store.session import keep_freed_memory
from pgreembed.store.slots import Slot, load_slots
from pgreembed.store.versions import upgrade
from pgreembed.store.write_slices import WriteSlicer

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
    ready, failed, _ = prepare(rows, provider, slot.target.truncate,
                                too_long_advice(slot.target.parent is not None))
    record_failures(conn, slot, failed)
    if not ready:
        conn.commit()
        return 0
    row = conn.execute("INSERT INTO pgreembed.batch_jobs (slot_id, inputs, asked)"
                       " VALUES (%s, %s, %s) RETURNING id",
                       (slot.id, len(ready), Jsonb(asked_for(slot)))).fetchone()
    assert row is not None
    job_id = int(row[0])
    lines: list[str] = []
    records: list[tuple[int, int, int, str, Any, int]] = []
    for line_no, start in enumerate(range(0, len(ready), INPUTS_PER_LINE)):
        chunk = ready[start:start + INPUTS_PER_LINE]
        body: dict[str, Any] = {**asked_for(slot), "input": [text for _, text, _, _ in chunk],
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
                if not take_job(conn, job_id):  # another step is writing it
                    continue
                status: str = batch.status
                if status == "completed":
                    records = _download(client, batch)
                    made_by = [asked] if asked is not None else _made_by(client, batch)
                    # Written in slices of a few rows (on HNSW: see store.session).
                    keep_freed_memory(conn, settings.kept_memory_mb)
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
