"""Every process masks the secrets of its settings from start-up, whatever their shape.

A DSN password with an unencoded '@' is refused before libpq can print its tail as a
host name; a key not shaped like `sk-...` and a Redis password are masked in a process
that never built a provider.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import ROOT, Stack

PASSWORD = "Secret-Pw@Frag-77x"
FRAGMENTS = ("Secret-Pw", "Frag-77x")
API_KEY = "plain-Key-Mango-5521"
REDIS_PASSWORD = "Redis-Pass-Quince-91"


def test_dsn_password_with_at_sign_is_refused_without_showing_it(stack: Stack) -> None:
    stack.env["DATABASE_URL"] = f"postgresql://postgres:{PASSWORD}@127.0.0.1:1/db"
    for args in (("status",), ("tick",), ("init",), ("scheduler",)):
        result = stack.cli(*args, timeout=60)
        output = result.stdout + result.stderr
        assert result.returncode == 2, (args, output)
        assert "DATABASE_URL: the user name or password holds an '@'" in result.stderr, output
        for fragment in FRAGMENTS:
            assert fragment not in output, (args, output)


def test_secrets_of_the_settings_are_masked_in_a_process_without_provider(
        stack: Stack) -> None:
    """A process started as ours are (logging set up, settings read) masks what it logs:
    libpq's error for the '@' DSN (a real connection attempt: the config refuses that
    DSN, but an app or a tool may still hand it to libpq), the key and the Redis password."""
    script = """
import logging, os
from pgreembed.observability.logs import setup_logging
from pgreembed.config import ConfigError, load_settings
from pgreembed.errors import DatabaseError
from pgreembed.store.pool import connect
setup_logging()
log = logging.getLogger("probe")
try:
    load_settings()
except ConfigError as exc:
    log.warning("config: %s", exc)
try:
    connect(os.environ["DATABASE_URL"])
except DatabaseError as exc:
    log.warning("libpq: %s", exc)
log.warning("key %s redis %s", os.environ["OPENAI_API_KEY"], os.environ["REDIS_URL"])
"""
    host = stack.redis_url.split("://", 1)[1]
    env = {**stack.env, "OPENAI_API_KEY": API_KEY, "PGREEMBED_LOG_FORMAT": "json",
           "DATABASE_URL": f"postgresql://postgres:{PASSWORD}@127.0.0.1:1/db",
           "REDIS_URL": f"redis://:{REDIS_PASSWORD}@{host}"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    messages = [json.loads(line)["message"] for line in result.stderr.splitlines()]
    assert len(messages) == 3, result.stderr
    assert messages[0].startswith("config: DATABASE_URL: the user name or password"), messages
    assert messages[1].startswith("libpq: cannot connect to Postgres:"), messages
    assert "***127.0.0.1" in messages[1], messages  # libpq did print the tail as a host
    assert messages[2] == f"key *** redis redis://:***@{host}", messages
    for secret in (*FRAGMENTS, API_KEY, REDIS_PASSWORD):
        assert secret not in result.stderr + result.stdout
