"""`pgreembed demo`: the whole data path on one machine with nothing installed.

Starts embedded Postgres (pgvector) and a local Redis, loads the standard
library's docstrings into a table, runs the real scheduler and Dramatiq
worker processes with the offline model until every row is embedded, shows
that a newly inserted row is picked up within a second, runs a few
semantic searches, and stops everything it started.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pgreembed.config import Settings, environment, load_settings
from pgreembed.config.environment import child_environment
from pgreembed.demo.corpus import stdlib_docstrings
from pgreembed.errors import EXIT_OK
from pgreembed.operations.search import search
from pgreembed.operations.status import collect
from pgreembed.store.pool import connect
from pgreembed.store.setup import init_target
from pgreembed.testing.services import EmbeddedPostgres, LocalRedis

CONFIG = """
[[target]]
name = "docs"
table = "public.docs"
text_columns = ["title", "body"]
vector_column = "embedding"
provider = "local"
dimensions = 384
batch_size = 32

[worker]
poll_interval = 1.0
max_inflight_rows = 256
"""

QUERIES = [
    "compress data with gzip",
    "parse command line arguments",
    "send an email message over SMTP",
    "run a function in a separate thread",
]


def _load_corpus(dsn: str, rows: int) -> int:
    documents = list(stdlib_docstrings())
    step = max(1, len(documents) // rows)
    chosen = documents[::step][:rows]
    with connect(dsn, vector=False) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS docs (id bigserial PRIMARY KEY, title text"
                     " NOT NULL, body text, views integer NOT NULL DEFAULT 0)")
        with conn.cursor().copy("COPY docs (title, body) FROM STDIN") as copy:
            for title, body in chosen:
                copy.write_row((title, body))
        conn.commit()
    return len(chosen)


def _spawn(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    log = log_path.open("wb")
    return subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait_embedded(settings: Settings, expected_total: int, timeout: float,
                   on_progress: Callable[[int, int], None]) -> float:
    start = time.monotonic()
    while True:
        with connect(settings.database_url) as conn:
            status = collect(conn, settings, None, exact=True)[0]
        now = time.monotonic()
        if status.embedded + status.failed >= expected_total and status.total == expected_total:
            on_progress(status.embedded + status.failed, expected_total)
            return now - start
        on_progress(status.embedded + status.failed, expected_total)
        if now - start > timeout:
            raise TimeoutError(f"only {status.embedded}/{status.total} embedded after"
                               f" {timeout:.0f}s")
        time.sleep(0.2)


def _wait_row(dsn: str, title: str, timeout: float = 30.0) -> float:
    start = time.monotonic()
    with connect(dsn, autocommit=True) as conn:
        while time.monotonic() - start < timeout:
            row = conn.execute("SELECT embedding IS NOT NULL FROM docs WHERE title = %s",
                               (title,)).fetchone()
            if row and row[0]:
                return time.monotonic() - start
            time.sleep(0.05)
    raise TimeoutError(f"row {title!r} not embedded within {timeout}s")


def _no_progress(done: int, total: int) -> None:
    """The default: the caller (the CLI) draws progress, the demo itself does not."""


def run_demo(rows: int = 1000, workers: int = 2,
             on_progress: Callable[[int, int], None] = _no_progress) -> int:
    """The demo; `on_progress(done, total)` is called every 0.2 s while the corpus embeds."""
    scratch = Path(tempfile.mkdtemp(prefix="pgreembed-demo-"))
    postgres = EmbeddedPostgres(scratch / "pgdata")
    redis_server = LocalRedis()
    processes: list[subprocess.Popen[bytes]] = []
    try:
        print("starting embedded Postgres (pgvector) and a local Redis ...", flush=True)
        dsn = postgres.start()
        redis_url = redis_server.start()
        config_path = scratch / "pgreembed.toml"
        config_path.write_text(CONFIG)
        env = child_environment(**{
            environment.DATABASE_URL.name: dsn, environment.REDIS_URL.name: redis_url,
            environment.CONFIG.name: str(config_path), environment.LOCAL_THREADS.name: "1"})
        total = _load_corpus(dsn, rows)
        print(f"loaded {total} docstrings of the Python standard library into table docs")
        settings = load_settings(config_path, env)
        init_target(dsn, settings.target("docs"))

        python = sys.executable
        processes.append(_spawn([python, "-m", "dramatiq", "--processes", str(workers),
                                 "--threads", "1", "worker"], env, scratch / "worker.log"))
        processes.append(_spawn([python, "-m", "pgreembed", "scheduler"], env,
                                scratch / "scheduler.log"))
        print(f"scheduler + {workers} worker processes running (offline model"
              " all-MiniLM-L6-v2 int8); embedding ...", flush=True)
        elapsed = _wait_embedded(settings, total, timeout=900, on_progress=on_progress)
        print(f"all {total} rows embedded in {elapsed:.1f}s ({total / elapsed:.0f} rows/s)")

        with connect(dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO docs (title, body) VALUES ('demo.fresh', 'Freshly"
                         " inserted: a tutorial about brewing green tea at the right"
                         " temperature.')")
        print(f"a freshly inserted row was embedded {_wait_row(dsn, 'demo.fresh'):.2f}s"
              " after its INSERT")

        for query in QUERIES:
            print(f"\nsearch: {query!r}")
            with connect(dsn) as conn:
                for hit in search(conn, settings, "docs", query, limit=3):
                    first_line = (hit.text.splitlines() or [""])[0]
                    print(f"  {hit.distance:.3f}  {first_line[:90]}")
        return EXIT_OK
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
        redis_server.stop()
        postgres.stop()
        print(f"\nstopped everything (logs were in {scratch})")
