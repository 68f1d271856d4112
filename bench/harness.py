"""Shared machinery of the benchmarks: real services, copies of one table, our processes.

Every section measures ours and its baseline against the same rows: a template
database per row count is filled once, and each run gets `CREATE DATABASE ...
TEMPLATE`, a byte-identical fresh copy. Services are the real ones the tests use
(embedded Postgres 18 + pgvector under /tmp, a redis-server process, the local
OpenAI-compatible server over HTTP at zero latency).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import psycopg
import redis
from psycopg import sql
from psycopg.conninfo import make_conninfo

from pgreembed.testing.fake_openai import FakeOpenAIServer
from pgreembed.testing.services import EmbeddedPostgres, LocalRedis

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "sk-bench-local-0000"

_WORDS = [
    "postgres", "vector", "index", "embedding", "queue", "worker", "batch", "latency",
    "throughput", "replica", "table", "column", "schema", "trigger", "notify", "scheduler",
    "lease", "claim", "retry", "backoff", "provider", "token", "model", "migration", "swap",
    "rollback", "cosine", "distance", "neighbour", "search", "query", "plan", "cache", "memory",
    "disk", "page", "tuple", "heap", "toast", "vacuum", "analyze", "commit", "snapshot",
    "isolation", "lock", "network", "socket", "request", "response", "header", "budget",
    "window", "minute", "second", "limit", "error", "document", "title", "body", "author",
    "summary", "section", "paragraph", "sentence", "word", "letter", "number",
]


def texts(start: int, count: int, words: int = 60) -> list[str]:
    """Deterministic documents of ~`words` words (~100 tokens each): same rows every run."""
    out = []
    for i in range(start, start + count):
        rng = random.Random(i)
        out.append(f"Document {i}. " + " ".join(rng.choices(_WORDS, k=words)) + ".")
    return out


@dataclass(frozen=True)
class Tuning:
    """Our pipeline's knobs for a run (reported with every result)."""

    batch_size: int = 512
    processes: int = 2
    threads: int = 4
    max_inflight_rows: int = 4096
    pool_max_size: int = 4

    def describe(self) -> str:
        return (f"batch_size={self.batch_size}, dramatiq --processes {self.processes}"
                f" --threads {self.threads}, max_inflight_rows={self.max_inflight_rows},"
                f" pool_max_size={self.pool_max_size}")


def tiktoken_cache_dir() -> str | None:
    """A directory holding tiktoken's cl100k_base file (pgai's wheel bundles one), if any."""
    if os.environ.get("TIKTOKEN_CACHE_DIR"):
        return os.environ["TIKTOKEN_CACHE_DIR"]
    try:
        import pgai.vectorizer as vectorizer_package
    except ImportError:
        return None
    folder = Path(vectorizer_package.__file__).parent / "tiktoken_cache"
    # sha1 of the cl100k_base URL: the name tiktoken looks for in its cache directory.
    return str(folder) if (folder / "9b5ad71b2ce5302211f9c61530b329a4922fc6a4").exists() else None


class Services:
    """Postgres, Redis and the fake provider for the whole run; databases per measurement."""

    def __init__(self, model: str, dims: int) -> None:
        self.model = model
        self.dims = dims
        self.workdir = Path(tempfile.mkdtemp(prefix="pgreembed-bench-"))
        self.postgres = EmbeddedPostgres(self.workdir / "pgdata")
        self.redis = LocalRedis()
        self.fake = FakeOpenAIServer(api_key=API_KEY)
        self.admin_dsn = ""
        self._templates: dict[str, str] = {}

    def start(self) -> Services:
        self.admin_dsn = self.postgres.start()
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET max_connections = 200")
        self.postgres.restart()
        self.redis.start()
        self.fake.start()
        return self

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.fake.stop()
        self.redis.stop()
        self.postgres.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def dsn(self, dbname: str) -> str:
        return make_conninfo(self.admin_dsn, dbname=dbname)

    def template(self, rows: int, index: str | None = None) -> str:
        """A database with table docs(id, body, inserted_at) of `rows` rows, built once;
        with `index` (a key of INDEXES), also an empty vector column carrying that index,
        as the app's table has before a backfill."""
        key = f"{rows}_{index}" if index else str(rows)
        if key in self._templates:
            return self._templates[key]
        if index:
            return self._indexed_template(rows, index, key)
        name = f"bench_src_{rows}"
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        with psycopg.connect(self.dsn(name), autocommit=True) as conn:
            conn.execute("CREATE EXTENSION vector")
            conn.execute("CREATE TABLE docs (id bigint PRIMARY KEY, body text NOT NULL,"
                         " inserted_at timestamptz NOT NULL DEFAULT clock_timestamp())")
            with conn.cursor() as cur, cur.copy("COPY docs (id, body) FROM STDIN") as copy:
                for start in range(1, rows + 1, 10_000):
                    count = min(10_000, rows + 1 - start)
                    for offset, text in enumerate(texts(start, count)):
                        copy.write_row((start + offset, text))
            conn.execute("VACUUM ANALYZE docs")
        self._templates[key] = name
        return name

    def _indexed_template(self, rows: int, index: str, key: str) -> str:
        name = f"bench_src_{key}"
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(self.template(rows))))
        with psycopg.connect(self.dsn(name), autocommit=True) as conn:
            kind = vector_type(self.dims)
            conn.execute(sql.SQL("ALTER TABLE docs ADD COLUMN embedding {}").format(
                sql.SQL(f"{kind}({self.dims})")))
            conn.execute(index_sql(index, kind, "embedding"))
        self._templates[key] = name
        return name

    def fresh_copy(self, rows: int, label: str, index: str | None = None) -> str:
        """A new database, a copy of the `rows` template (with `index`); returns its DSN."""
        source = self.template(rows, index)
        name = f"bench_{label}_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(source)))
        return self.dsn(name)

    def drop(self, dsn: str) -> None:
        name = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(str(name))))

    def flush_redis(self) -> None:
        redis.Redis.from_url(self.redis.url).flushall()


# The indexes an app's search column carries (pgvector's defaults for HNSW; IVFFlat with
# 100 lists, its documented starting point for up to ~1M rows).
INDEXES = {"hnsw": ("hnsw", "m = 16, ef_construction = 64"), "ivfflat": ("ivfflat", "lists = 100")}


def vector_type(dims: int) -> str:
    """pgvector indexes `vector` up to 2000 dims, `halfvec` up to 4000."""
    return "vector" if dims <= 2000 else "halfvec"


def index_sql(index: str, kind: str, column: str, concurrently: bool = False) -> sql.Composed:
    method, options = INDEXES[index]
    return sql.SQL("CREATE INDEX {} ON docs USING {} ({} {}) WITH ({})").format(
        sql.SQL("CONCURRENTLY") if concurrently else sql.SQL(""), sql.SQL(method),
        sql.Identifier(column), sql.SQL(f"{kind}_cosine_ops"), sql.SQL(options))


def count_pending(conn: psycopg.Connection, column: str = "embedding") -> int:
    row = conn.execute(sql.SQL("SELECT count(*) FROM docs WHERE {} IS NULL").format(
        sql.Identifier(column))).fetchone()
    return int(row[0]) if row else 0


@dataclass
class Progress:
    """How many rows had a vector when (monotonic seconds), polled.

    `cold_start` is when the setup began (our `init` + worker start-up; pgai's install +
    create_vectorizer), `started` when the work was launched (`tick`; pgai's workers).
    """

    rows: int
    cold_start: float
    started: float
    samples: list[tuple[float, int]] = field(default_factory=list)
    poll_seconds: float = 0.0  # spent counting (Postgres CPU that is the bench's, not ours)

    @property
    def done_at(self) -> float:
        return self.samples[-1][0]

    def _reached(self, share: float) -> float:
        return next(t for t, done in self.samples if done >= share * self.rows)

    def first_vector_after(self) -> float:
        return next(t for t, done in self.samples if done > 0) - self.started

    def cold(self) -> float:
        """Rows/s from the start of the setup to the last vector."""
        return self.rows / (self.done_at - self.cold_start)

    def warm(self) -> float:
        """Rows/s from launching the work to the last vector."""
        return self.rows / (self.done_at - self.started)

    def steady(self) -> float | None:
        """Rows/s between 10% and 90% of the rows done (None: too few polls in between)."""
        span = self._reached(0.9) - self._reached(0.1)
        return 0.8 * self.rows / span if span >= 0.5 else None


def fmt_rate(rate: float | None) -> str:
    return "n/a (too fast to poll)" if rate is None else f"{rate:,.0f} rows/s"


def wait_all_embedded(dsn: str, rows: int, cold_start: float, started: float, timeout: float,
                      alive: Callable[[], bool] = lambda: True,
                      count_done: Callable[[psycopg.Connection], int] | None = None
                      ) -> Progress:
    """Poll until no row lacks a vector, recording progress over time.

    Counting pending rows is not free (dead index entries pile up while rows are
    updated): ~20 ms of Postgres CPU per poll at 100k rows, on the cores being
    measured. So the poll interval grows with the elapsed time (2% of it, between
    0.05 and 1 s; the measured end is at most that late), and `count_done` can give
    a cheaper exact count (ours: the usage ledger, written in the same transaction as
    the vectors). Either way, the end is confirmed by counting pending rows."""
    progress = Progress(rows, cold_start, started)
    with psycopg.connect(dsn, autocommit=True) as conn:
        while True:
            before = time.monotonic()
            done = count_done(conn) if count_done else rows - count_pending(conn)
            now = time.monotonic()
            progress.poll_seconds += now - before
            if done >= rows and count_done and count_pending(conn):
                done = rows - 1  # not finished after all (a row done twice?): keep polling
            progress.samples.append((now, min(done, rows)))
            if done >= rows:
                return progress
            if now - started > timeout:
                raise TimeoutError(f"{rows - done} of {rows} rows still without a vector after"
                                   f" {timeout:.0f}s")
            if not alive():
                raise RuntimeError(f"a process exited with {rows - done} of {rows} rows left")
            time.sleep(min(1.0, max(0.05, (now - started) / 50)))


def rows_in_usage_ledger(conn: psycopg.Connection) -> int:
    """Rows our workers wrote, from the ledger they update in the same transaction."""
    row = conn.execute("SELECT coalesce(sum(inputs), 0) FROM pgreembed.usage").fetchone()
    return int(row[0]) if row else 0


def verify_vectors(dsn: str, model: str, dims: int, count: int, sample: int = 5) -> None:
    """Spot-check that stored vectors (ids 1..count) are the provider's for the row's text."""
    import numpy as np

    from pgreembed.testing.fake_vectors import fake_vector

    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT body, embedding::text FROM docs WHERE id = ANY(%s)",
                            (random.sample(range(1, count + 1), min(sample, count)),)).fetchall()
    if len(rows) != min(sample, count):
        raise AssertionError("rows to spot-check are missing")
    for body, stored in rows:
        got = np.array([float(x) for x in stored.strip("[]").split(",")], dtype=np.float32)
        if not np.allclose(got, fake_vector(model, body, dims), atol=1e-3):
            raise AssertionError("a stored vector is not the provider's vector for its text")


def _tree_cpu(pid: int, include_reaped: bool = True) -> float:
    """CPU seconds of a process and its live descendants (plus children it reaped)."""
    try:
        root = psutil.Process(pid)
        times = root.cpu_times()
        total = times.user + times.system
        if include_reaped:
            total += times.children_user + times.children_system
        for child in root.children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                child_times = child.cpu_times()
                total += child_times.user + child_times.system
        return total
    except psutil.NoSuchProcess:
        return 0.0


def postgres_cpu(data_dir: Path) -> float:
    """CPU seconds of a local Postgres server: its postmaster and every backend, those
    that exited included (0 if it is not running)."""
    pid_file = data_dir / "postmaster.pid"
    return _tree_cpu(int(pid_file.read_text().split()[0])) if pid_file.exists() else 0.0


def backend_cpu(admin_dsn: str) -> dict[int, tuple[str, float]]:
    """Per live server process of a local Postgres: (who: its application_name, else its
    backend type; CPU seconds so far). A window's share per who is the difference of two
    of these (a backend that exited meanwhile is in postgres_cpu's total only)."""
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT pid, coalesce(nullif(application_name, ''), backend_type,"
                            " '?') FROM pg_stat_activity").fetchall()
    out = {}
    for pid, who in rows:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = psutil.Process(pid).cpu_times()
            out[int(pid)] = (str(who), times.user + times.system)
    return out


def cpu_by_backend(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]
                   ) -> dict[str, float]:
    """CPU seconds per who between two backend_cpu readings (backends alive at the second)."""
    used: dict[str, float] = {}
    for pid, (who, cpu) in after.items():
        start = before.get(pid)
        used[who] = used.get(who, 0.0) + cpu - (start[1] if start and start[0] == who else 0.0)
    return {who: round(cpu, 1) for who, cpu in sorted(used.items(), key=lambda kv: -kv[1])}


class CpuMeter:
    """Where the CPU time of a measured window went: Postgres (every backend), Redis,
    our workers, and this process (the local provider server's threads)."""

    def __init__(self, services: Services, worker_pid: int | None) -> None:
        self.services = services
        self.worker_pid = worker_pid
        self.start_values = self._read()
        self.used: dict[str, float] = {}

    def _read(self) -> dict[str, float]:
        me = psutil.Process().cpu_times()
        values = {
            "postgres": postgres_cpu(self.services.postgres.data_dir),
            "redis": _tree_cpu(self.services.redis.process.pid)
            if self.services.redis.process else 0.0,
            # Our own threads: the provider server (plus a little polling); children we
            # reaped meanwhile are the one-shot `pgreembed tick` process.
            "provider": me.user + me.system,
            "tick": me.children_user + me.children_system,
        }
        if self.worker_pid is not None:
            values["workers"] = _tree_cpu(self.worker_pid, include_reaped=False)
        return values

    def stop(self) -> dict[str, float]:
        end = self._read()
        self.used = {k: end[k] - self.start_values.get(k, 0.0) for k in end}
        return self.used

    def describe(self) -> str:
        order = ("workers", "writer", "provider", "postgres", "redis", "tick")
        parts = [f"{k} {self.used[k]:.1f}" for k in order if k in self.used]
        return f"CPU s: {', '.join(parts)} (total {sum(self.used.values()):.1f})"


class RssSampler(threading.Thread):
    """Samples the resident memory of a process tree (children included) every 0.1 s."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.pid = pid
        self.interval = interval
        self.peak_total = 0
        self.peak_single = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(self.pid)
            while not self._stop_event.is_set():
                total = 0
                for proc in [root, *root.children(recursive=True)]:
                    with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                        rss = proc.memory_info().rss
                        total += rss
                        self.peak_single = max(self.peak_single, rss)
                self.peak_total = max(self.peak_total, total)
                self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)


@dataclass
class Pipeline:
    """Our processes (worker, scheduler, tick) against one database."""

    services: Services
    dsn: str
    tuning: Tuning
    extra_target: dict[str, int] = field(default_factory=dict)
    extra_config: str = ""  # more TOML sections (e.g. [throttle])
    model: str = ""  # the target's model (default: the services' model)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    long_lived: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logdir: Path = field(init=False)
    config_path: Path = field(init=False)
    env: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.logdir = Path(tempfile.mkdtemp(prefix="run-", dir=self.services.workdir))
        extra = "".join(f"{key} = {value}\n" for key, value in self.extra_target.items())
        self.config_path = self.logdir / "pgreembed.toml"
        self.config_path.write_text(
            "[[target]]\n"
            'name = "docs"\n'
            'table = "public.docs"\n'
            'text_column = "body"\n'
            'vector_column = "embedding"\n'
            'provider = "openai"\n'
            f'model = "{self.model or self.services.model}"\n'
            f"dimensions = {self.services.dims}\n"
            f"batch_size = {self.tuning.batch_size}\n"
            f"{extra}"
            "\n[worker]\n"
            "poll_interval = 0.5\n"
            f"max_inflight_rows = {self.tuning.max_inflight_rows}\n"
            f"pool_max_size = {self.tuning.pool_max_size}\n"
            f"{self.extra_config}")
        self.env = {
            **os.environ,
            "DATABASE_URL": self.dsn,
            "REDIS_URL": self.services.redis.url,
            "PGREEMBED_CONFIG": str(self.config_path),
            "OPENAI_API_KEY": API_KEY,
            "OPENAI_BASE_URL": self.services.fake.base_url,
            "PYTHONPATH": str(ROOT),
        }
        cache = tiktoken_cache_dir()
        if cache:
            self.env["TIKTOKEN_CACHE_DIR"] = cache

    def cli(self, *args: str) -> None:
        result = subprocess.run([sys.executable, "-m", "pgreembed", *args], env=self.env,
                                capture_output=True, text=True, cwd=ROOT, timeout=600)
        if result.returncode != 0:
            raise RuntimeError(f"pgreembed {' '.join(args)} failed ({result.returncode}):"
                               f" {result.stderr[-2000:]}")

    def spawn(self, name: str, args: list[str], service: bool = True
              ) -> subprocess.Popen[bytes]:
        """Start a process in its own group; `service`: it must stay up during the run."""
        log = (self.logdir / f"{name}.log").open("ab")
        process = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                   cwd=ROOT, start_new_session=True)
        self.processes.append(process)
        if service:
            self.long_lived.append(process)
        return process

    def worker_command(self) -> list[str]:
        return [sys.executable, "-m", "dramatiq", "--processes", str(self.tuning.processes),
                "--threads", str(self.tuning.threads), "worker"]

    def start_worker(self, wrapper: list[str] | None = None) -> subprocess.Popen[bytes]:
        process = self.spawn("worker", [*(wrapper or []), *self.worker_command()])
        self.wait_log("worker", "Worker process is ready for action.", self.tuning.processes)
        return process

    def start_scheduler(self) -> subprocess.Popen[bytes]:
        process = self.spawn("scheduler", [sys.executable, "-m", "pgreembed", "scheduler"])
        self.wait_log("scheduler", "scheduler running", 1)
        return process

    def start_tick(self, timeout: float) -> subprocess.Popen[bytes]:
        return self.spawn("tick", [sys.executable, "-m", "pgreembed", "tick", "--wait",
                                   "--timeout", str(timeout)], service=False)

    def log_text(self, name: str) -> str:
        path = self.logdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_log(self, name: str, needle: str, count: int, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while self.log_text(name).count(needle) < count:
            if time.monotonic() > deadline or not self.alive():
                raise RuntimeError(f"{name} did not start: {self.log_text(name)[-2000:]}")
            time.sleep(0.05)

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.long_lived)

    def stop(self) -> None:
        """SIGTERM the process groups we started, SIGKILL what is left after 15 s."""
        for process in self.processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for process in self.processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)
        self.processes.clear()
        self.long_lived.clear()


@contextlib.contextmanager
def pipeline(services: Services, dsn: str, tuning: Tuning,
             extra_target: dict[str, int] | None = None, init: bool = True,
             extra_config: str = "", model: str = "") -> Iterator[Pipeline]:
    """Our pipeline on `dsn` (`pgreembed init` done unless `init=False`), stopped on exit."""
    services.flush_redis()
    run = Pipeline(services, dsn, tuning, dict(extra_target or {}), extra_config, model)
    if init:
        run.cli("init")
    try:
        yield run
    finally:
        run.stop()
