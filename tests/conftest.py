"""Real services for the tests: Postgres + pgvector, Redis, the OpenAI-compatible server.

Postgres is $TEST_DATABASE_URL / $DATABASE_URL when given (it must have
pgvector), otherwise an embedded Postgres 18 started for the session. Every
test gets a database of its own, a flushed Redis and a reset fake provider.
"""

from __future__ import annotations

import compileall
import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from psycopg.conninfo import make_conninfo

from pgreembed.testing.fake_openai import FakeOpenAIServer
from pgreembed.testing.services import EmbeddedPostgres, LocalRedis
from tests.helpers import (
    API_KEY,
    ROOT,
    OrdinaryRoles,
    Stack,
    create_ordinary_roles,
    docs_config,
    drop_ordinary_roles,
    write_config,
)


@pytest.fixture(scope="session", autouse=True)
def project_bytecode() -> None:
    """The project's modules compiled once, before the tests start its processes.

    The tests start hundreds of Python processes (the CLI, workers, schedulers). Under
    PYTHONDONTWRITEBYTECODE=1 (set on the development machine) none of them saves the
    bytecode it compiles, so each compiled every project module it imports again: ~0.08 s
    of CPU of a `pgreembed status` call (~0.5 s). Python reads bytecode that exists
    whatever that variable says (and recompiles a module whose source is newer)."""
    if not sys.flags.dont_write_bytecode:
        return  # each process saves what it compiles: the first one pays
    for package in ("pgreembed", "worker", "scheduler"):
        compileall.compile_dir(ROOT / package, quiet=1)


@pytest.fixture(scope="session")
def server_dsn() -> Iterator[str]:
    given = os.environ.get("TEST_DATABASE_URL") or os.environ.get("DATABASE_URL")
    if given:
        check_given_server(given)
        yield given
        return
    postgres = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="pgreembed-test-")) / "pgdata")
    dsn = postgres.start()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET max_connections = 300")
    postgres.restart()
    yield dsn
    postgres.stop()


def check_given_server(dsn: str) -> None:
    """What the tests need of a server they are given, said once instead of in every test."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT rolsuper, EXISTS (SELECT FROM pg_available_extensions WHERE name = 'vector')"
            " FROM pg_roles WHERE rolname = current_user").fetchone()
    if row is None or not all(row):
        pytest.fail("TEST_DATABASE_URL: the tests need a superuser role (they create"
                    " databases, roles and the vector extension) on a server with pgvector;"
                    f" this one: superuser {row and row[0]}, pgvector available"
                    f" {row and row[1]}", pytrace=False)


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
    stop_processes(s.processes)




@pytest.fixture
def ordinary_roles(stack: Stack) -> Iterator[tuple[Stack, OrdinaryRoles]]:
    """The stack with pgreembed's processes (DATABASE_URL) running as an ordinary role
    (tests.helpers.OrdinaryRoles); `stack.dsn` stays the admin's, for the test's own checks.
    """
    roles = create_ordinary_roles(stack.dsn)
    managed = dataclasses.replace(stack, env={**stack.env,
                                              "DATABASE_URL": roles.pgreembed_dsn})
    yield managed, roles
    stop_processes(managed.processes)  # the stack's list: their sessions end before the roles
    drop_ordinary_roles(stack.dsn, roles)


def stop_processes(processes: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM (graceful) every process still running, then wait; SIGKILL after 15 s.

    Each was started in a session of its own (Stack.spawn), so what is left of its
    process group afterwards (dramatiq's forked workers, orphaned when their parent is
    killed) is killed too: a worker thread still sleeping for rate-limit budget would
    otherwise send its request to the shared test server during the next test."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
