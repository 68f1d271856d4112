-- Runs once, when the compose Postgres volume is first created: the extension and
-- the example table that deploy/pgreembed.example.toml points at. Replace it with
-- your application's schema; `pgreembed init` adds the vector column, the partial
-- index and the triggers.
CREATE EXTENSION IF NOT EXISTS vector;
CREATE TABLE IF NOT EXISTS public.docs (
    id bigserial PRIMARY KEY,
    title text,
    body text,
    created_at timestamptz NOT NULL DEFAULT now()
);
