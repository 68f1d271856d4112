"""Real services for the tests: Postgres + pgvector, Redis, the OpenAI-compatible server.

Postgres is $TEST_DATABASE_URL / $DATABASE_URL when given (it must have
pgvector), otherwise an embedded Postgres 18 started for the session. Every
test gets a database of its own, a flushed Redis and a reset fake provider.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import redis
from psycopg.conninfo import make_conninfo

from pgreembed.testing.fake_openai import FakeOpenAIServer
from pgreembed.testing.services import EmbeddedPostgres, LocalRedis

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "sk-test-Zq8sEcReT0pgreembed"


@pytest.fixture(scope="session")
def server_dsn() -> Iterator[str]:
    given = os.environ.get("TEST_DATABASE_URL") or os.environ.get("DATABASE_URL")
    if given:
        yield given
        return
    postgres = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="pgreembed-test-")) / "pgdata")
    dsn = postgres.start()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET max_connections = 300")
    postgres.restart()
    yield dsn
    postgres.stop()


@pytest.fixture
def database_url(server_dsn: str) -> Iterator[str]:
    """A fresh database with pgvector, dropped after the test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    dsn = make_conninfo(server_dsn, dbname=name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    yield dsn
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def redis_session() -> Iterator[LocalRedis]:
    server = LocalRedis()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_session: LocalRedis) -> str:
    redis.Redis.from_url(redis_session.url).flushall()
    return redis_session.url


@pytest.fixture(scope="session")
def fake_server() -> Iterator[FakeOpenAIServer]:
    server = FakeOpenAIServer(api_key=API_KEY).start()
    yield server
    server.stop()


@pytest.fixture
def fake_openai(fake_server: FakeOpenAIServer) -> FakeOpenAIServer:
    fake_server.reset()
    return fake_server


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
        from pgreembed.store.pool import connect

        return connect(self.dsn, autocommit=True)


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


@pytest.fixture
def stack(database_url: str, redis_url: str, fake_openai: FakeOpenAIServer,
          tmp_path: Path) -> Iterator[Stack]:
    """A docs table, its config, and the environment the processes share."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE docs (id bigserial PRIMARY KEY, title text, body text,"
                     " views integer NOT NULL DEFAULT 0)")
    config = write_config(tmp_path / "pgreembed.toml", docs_config())
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "PGREEMBED_CONFIG": str(config),
        "OPENAI_API_KEY": API_KEY,
        "OPENAI_BASE_URL": fake_openai.base_url,
        "PGREEMBED_HEARTBEAT_MS": "5000",
        "PYTHONPATH": str(ROOT),
    }
    logs = tmp_path / "logs"
    logs.mkdir()
    s = Stack(database_url, redis_url, config, env, logs, [])
    yield s
    for process in s.processes:
        if process.poll() is None:
            process.terminate()
    for process in s.processes:
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()


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

