"""The bookkeeping's DDL in schema `pgreembed`, by version (applied by pgreembed.store.versions).

A step runs once, in order, in `init`'s transaction: later steps are plain DDL (no
IF NOT EXISTS). Step 1 is the layout of the release before versioning; it is written
idempotently because it also adopts a database that release made (whose columns were
added one `ADD COLUMN IF NOT EXISTS` at a time).
"""

from __future__ import annotations

from pgreembed.store.slots import NOTIFY_CHANNEL

# Schema pgreembed itself is made by privileges.ensure_schema (or by an admin beforehand).
VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS pgreembed.schema_version (
    version integer PRIMARY KEY,
    description text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
"""

V1_TABLES = """
CREATE TABLE IF NOT EXISTS pgreembed.models (
    id serial PRIMARY KEY,
    key text NOT NULL UNIQUE,
    provider text NOT NULL,
    name text NOT NULL,
    dimensions integer NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    -- Budgets recorded by `migrate start` for the model called (read by every worker).
    requests_per_minute integer,
    tokens_per_minute integer
);
CREATE TABLE IF NOT EXISTS pgreembed.slots (
    id serial PRIMARY KEY,
    target text NOT NULL,
    schema_name text NOT NULL,
    table_name text NOT NULL,
    vector_column text NOT NULL,
    primary_key text NOT NULL,
    pk_type text NOT NULL,
    role text NOT NULL CHECK (role IN ('live', 'next', 'old', 'dropped')),
    model_id integer NOT NULL REFERENCES pgreembed.models (id),
    created_at timestamptz NOT NULL DEFAULT now(),
    paused boolean NOT NULL DEFAULT false,
    mode text NOT NULL DEFAULT 'queue',
    paused_by text,  -- why a slot was paused: 'operator' or 'spend_cap'
    -- Why the provider cannot fill a slot as configured: no batch is dispatched for it
    -- until `pgreembed init` clears it.
    misconfigured text,
    misconfigured_at timestamptz
);
CREATE UNIQUE INDEX IF NOT EXISTS slots_one_live ON pgreembed.slots (target)
    WHERE role = 'live';
CREATE TABLE IF NOT EXISTS pgreembed.migrations (
    id serial PRIMARY KEY,
    target text NOT NULL,
    from_slot integer NOT NULL REFERENCES pgreembed.slots (id),
    to_slot integer NOT NULL REFERENCES pgreembed.slots (id),
    phase text NOT NULL CHECK (phase IN ('filling', 'swapped', 'rolled_back', 'finalized',
                                         'cancelled')),
    started_at timestamptz NOT NULL DEFAULT now(),
    swapped_at timestamptz,
    finished_at timestamptz,
    spend_cap_usd numeric,
    price_per_mtoken numeric
);
CREATE UNIQUE INDEX IF NOT EXISTS migrations_one_open ON pgreembed.migrations (target)
    WHERE phase IN ('filling', 'swapped', 'rolled_back');
-- Tokens sent to providers, one row per batch (insert-only: no hot row between workers),
-- with the model that billed them (a slot's model changes in place): its price applies.
CREATE TABLE IF NOT EXISTS pgreembed.usage (
    slot_id integer NOT NULL,
    at timestamptz NOT NULL DEFAULT now(),
    inputs integer NOT NULL,
    tokens bigint NOT NULL,
    model text
);
CREATE INDEX IF NOT EXISTS usage_slot ON pgreembed.usage (slot_id, at);
-- Spend caps: a batch's estimated tokens, held from before its request until its billed
-- tokens are in pgreembed.usage (pgreembed.store.usage).
CREATE TABLE IF NOT EXISTS pgreembed.spend_reservations (
    id bigserial PRIMARY KEY,
    slot_id integer NOT NULL,
    tokens bigint NOT NULL,
    expires_at timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS spend_reservations_slot ON pgreembed.spend_reservations (slot_id);
-- The Batch API's jobs and the rows each line of a job holds (migrations.batch_api).
CREATE TABLE IF NOT EXISTS pgreembed.batch_jobs (
    id serial PRIMARY KEY,
    slot_id integer NOT NULL,
    provider_batch_id text,
    status text NOT NULL DEFAULT 'preparing',
    inputs integer NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);
CREATE TABLE IF NOT EXISTS pgreembed.batch_job_rows (
    job_id integer NOT NULL REFERENCES pgreembed.batch_jobs (id) ON DELETE CASCADE,
    line integer NOT NULL,
    position integer NOT NULL,
    pk text NOT NULL,
    content_hash uuid NOT NULL,
    tokens integer NOT NULL,
    PRIMARY KEY (job_id, line, position)
);
CREATE INDEX IF NOT EXISTS batch_job_rows_pk ON pgreembed.batch_job_rows (pk);
-- Quality gate (migrations.compare, operations.tune): the comparisons `migrate compare`
-- ran (the last one is shown by `migrate swap`), and per slot the index settings `tune`
-- recommended, which operations.search applies to its own statement.
CREATE TABLE IF NOT EXISTS pgreembed.comparisons (
    id bigserial PRIMARY KEY,
    migration_id integer NOT NULL REFERENCES pgreembed.migrations (id),
    measured_at timestamptz NOT NULL DEFAULT now(),
    report jsonb NOT NULL
);
CREATE INDEX IF NOT EXISTS comparisons_migration ON pgreembed.comparisons (migration_id, id);
CREATE TABLE IF NOT EXISTS pgreembed.index_settings (
    slot_id integer PRIMARY KEY REFERENCES pgreembed.slots (id),
    settings jsonb NOT NULL,
    index_name text NOT NULL,
    k integer NOT NULL,
    target_recall double precision NOT NULL,
    recall double precision NOT NULL,
    filter text,
    measured_at timestamptz NOT NULL DEFAULT now()
);
"""

# Columns the release before versioning added to existing tables one at a time: a
# database it made may lack any of them (CREATE TABLE IF NOT EXISTS does not add them).
V1_ADOPT_UNVERSIONED = """
ALTER TABLE pgreembed.slots ADD COLUMN IF NOT EXISTS paused boolean NOT NULL DEFAULT false;
ALTER TABLE pgreembed.slots ADD COLUMN IF NOT EXISTS mode text NOT NULL DEFAULT 'queue';
ALTER TABLE pgreembed.slots ADD COLUMN IF NOT EXISTS paused_by text;
ALTER TABLE pgreembed.slots ADD COLUMN IF NOT EXISTS misconfigured text;
ALTER TABLE pgreembed.slots ADD COLUMN IF NOT EXISTS misconfigured_at timestamptz;
ALTER TABLE pgreembed.usage ADD COLUMN IF NOT EXISTS model text;
ALTER TABLE pgreembed.migrations ADD COLUMN IF NOT EXISTS spend_cap_usd numeric;
ALTER TABLE pgreembed.migrations ADD COLUMN IF NOT EXISTS price_per_mtoken numeric;
ALTER TABLE pgreembed.models ADD COLUMN IF NOT EXISTS requests_per_minute integer;
ALTER TABLE pgreembed.models ADD COLUMN IF NOT EXISTS tokens_per_minute integer;
"""

# Side fills (pgreembed.migrations.side_fill): a migration pgreembed started by itself
# (why: 'backlog' or 'model_change') and the step it is at, which the scheduler drives.
V2_SIDE_FILL = """
ALTER TABLE pgreembed.migrations ADD COLUMN auto_reason text;
ALTER TABLE pgreembed.migrations ADD COLUMN auto_step text;
"""

# Pay once per text (pgreembed.embedding.reuse): each state table gets an index on the
# text hash per model, so a batch finds rows already embedded from the same text by a
# probe, never a scan; the usage ledger counts the rows given such a copied vector.
# State tables made later get the index from `create_state_table`.
V3_REUSE = """
ALTER TABLE pgreembed.usage ADD COLUMN reused integer NOT NULL DEFAULT 0;
-- A derived migration (`migrate start --derive`): how its model's vectors were made
-- from the live ones, e.g. 'dimensions:256 of openai:text-embedding-3-large@3072'.
ALTER TABLE pgreembed.migrations ADD COLUMN derived text;
DO $$
DECLARE slot_id integer;
BEGIN
    FOR slot_id IN SELECT id FROM pgreembed.slots WHERE role <> 'dropped' LOOP
        IF to_regclass(format('pgreembed.%I', 'slot_' || slot_id)) IS NOT NULL THEN
            EXECUTE format('CREATE INDEX IF NOT EXISTS %I ON pgreembed.%I'
                           ' (pgr_model_id, pgr_hash)',
                           'slot_' || slot_id || '_hash', 'slot_' || slot_id);
        END IF;
    END LOOP;
END $$;
"""

V4_VECTOR_TYPE = """
-- The column's storage type, recorded rather than computed from the model's dimensions:
-- `migrate --derive halfvec` makes a halfvec column of a model a vector column held.
ALTER TABLE pgreembed.slots ADD COLUMN vector_type text;
UPDATE pgreembed.slots s
    SET vector_type = CASE WHEN m.dimensions <= 2000 THEN 'vector' ELSE 'halfvec' END
    FROM pgreembed.models m WHERE m.id = s.model_id;
ALTER TABLE pgreembed.slots ALTER COLUMN vector_type SET NOT NULL,
    ADD CONSTRAINT slots_vector_type CHECK (vector_type IN ('vector', 'halfvec'));
"""

# What a Batch API job's request lines asked for ({"model": ..., "dimensions": ...}),
# recorded at submit: the model that made its vectors, whatever the registry says when
# they are collected. NULL for a job submitted before: read back from its input file.
V5_BATCH_ASKED = """
ALTER TABLE pgreembed.batch_jobs ADD COLUMN asked jsonb;
"""

# Until when a `migrate batch` step has a finished job to itself while it writes it
# (migrations.batch_collect): a lease in the row, not a session lock, so a pooler in
# transaction mode between the step and Postgres cannot strand it.
V6_BATCH_COLLECTOR = """
ALTER TABLE pgreembed.batch_jobs ADD COLUMN collector_until timestamptz;
"""

# Replaced at every `init` (no data in them): what the application reads to know which
# column and model are live, and the NOTIFY the app table's trigger calls.
REPEATABLE = """
CREATE OR REPLACE VIEW pgreembed.active_models AS
    SELECT s.target, s.schema_name, s.table_name, s.vector_column, m.provider,
           m.name AS model, m.dimensions, s.vector_type
    FROM pgreembed.slots s JOIN pgreembed.models m ON m.id = s.model_id
    WHERE s.role = 'live';
CREATE OR REPLACE FUNCTION pgreembed.notify_changed() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM pg_notify('""" + NOTIFY_CHANNEL + """', TG_ARGV[0]);
    RETURN NULL;
END $$;
"""
