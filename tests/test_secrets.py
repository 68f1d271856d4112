"""Secrets never leak: not in logs, errors, tracebacks or status output.

The worker, the scheduler and the CLI run at DEBUG level with a DSN that
carries a password and an API key the provider rejects (401), and Postgres
is restarted under them, so every error path that might print a connection
string or a request header gets its chance.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from pgreembed.testing.fake_openai import FakeOpenAIServer
from pgreembed.testing.services import EmbeddedPostgres
from tests.helpers import ROOT, Stack, docs_config, pg_outage, seed, wait_for

PASSWORD = "Zebra-Pass-77-9qX"
WRONG_KEY = "key-Wrong-Kiwi-0451xyz"  # not shaped like sk-...: only exact-value redaction hides it


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[EmbeddedPostgres]:
    """A server of our own: the test restarts it."""
    server = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="pgreembed-secrets-")) / "pgdata")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def secret_stack(own_postgres: EmbeddedPostgres, redis_url: str, fake_openai: FakeOpenAIServer,
                 tmp_path: Path) -> Iterator[Stack]:
    admin = own_postgres.start()
    name = f"secrets_{uuid.uuid4().hex[:10]}"
    role = f"app_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN SUPERUSER PASSWORD '{PASSWORD}'")
        conn.execute(f'CREATE DATABASE "{name}" OWNER {role}')
    dsn = f"postgresql://{role}:{PASSWORD}@/{name}?host={own_postgres.data_dir}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION vector")
        conn.execute("CREATE TABLE docs (id bigserial PRIMARY KEY, title text, body text,"
                     " views integer NOT NULL DEFAULT 0)")
    config = tmp_path / "pgreembed.toml"
    config.write_text(docs_config())
    env = {**os.environ, "DATABASE_URL": dsn, "REDIS_URL": redis_url,
           "PGREEMBED_CONFIG": str(config), "OPENAI_API_KEY": WRONG_KEY,
           "OPENAI_BASE_URL": fake_openai.base_url, "PGREEMBED_LOG_LEVEL": "DEBUG",
           "PGREEMBED_HEARTBEAT_MS": "3000", "PYTHONPATH": str(ROOT)}
    logs = tmp_path / "logs"
    logs.mkdir()
    stack = Stack(dsn, redis_url, config, env, logs, [])
    seed(stack, 50)
    yield stack
    for process in stack.processes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
    with contextlib.suppress(psycopg.Error), psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f"DROP ROLE IF EXISTS {role}")


def test_no_secret_in_any_output(secret_stack: Stack, own_postgres: EmbeddedPostgres,
                                 fake_openai: FakeOpenAIServer) -> None:
    stack = secret_stack
    outputs: list[str] = []

    def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        saved = stack.env
        stack.env = env or saved
        try:
            result = stack.cli(*args)
        finally:
            stack.env = saved
        outputs.append(f"$ pgreembed {' '.join(args)}\n{result.stdout}{result.stderr}")
        return result

    assert cli("init").returncode == 0
    fake_openai.set_faults(echo_rejected_key_count=1000)  # every 401 quotes the key back
    stack.start_worker(processes=1, threads=2)
    stack.start_scheduler()
    # The provider rejects the key: batches fail, are retried, and are logged.
    wait_for(lambda: fake_openai.stats()["status_counts"].get("401", 0) >= 3, timeout=60,
             message="the provider's 401 answers")
    pg_outage(own_postgres, 2.0)  # pools, the listener and the leader lock reconnect
    wait_for(lambda: "reconnecting" in stack.log_text(), timeout=30,
             message="the scheduler to notice the restart")
    with psycopg.connect(stack.dsn, autocommit=True) as conn:
        conn.execute("UPDATE docs SET body = 'changed' WHERE id <= 5")  # more work after it
    wait_for(lambda: fake_openai.stats()["status_counts"].get("401", 0) >= 6, timeout=60,
             message="401 answers after the restart")
    assert cli("status").returncode == 0
    assert cli("status", "--json").returncode == 0
    assert cli("failures", "--target", "docs").returncode == 0
    assert cli("tick").returncode == 0
    # Postgres unreachable: the error names the problem, not the password.
    unreachable = stack.dsn.replace(str(own_postgres.data_dir), "/nonexistent/socket/dir")
    result = cli("status", env={**stack.env, "DATABASE_URL": unreachable})
    assert result.returncode == 1 and "cannot connect" in result.stderr
    result = cli("search", "--target", "docs", "anything")  # 401 in the CLI itself
    assert result.returncode == 1 and re.search(r"\b401\b", result.stderr), result.stderr
    for process in stack.processes:  # flush everything they would log on the way out
        os.killpg(process.pid, signal.SIGTERM)
    for process in stack.processes:
        process.wait(30)

    text = stack.log_text() + "\n".join(outputs)
    assert re.search(r"\b401\b", text) and "reconnecting" in text  # the errors did happen
    # The server did quote the key, and what reached the logs was masked, not dropped.
    assert "Incorrect API key provided: ***" in text
    assert PASSWORD not in text
    assert WRONG_KEY not in text
    assert stack.dsn not in text
