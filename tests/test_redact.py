"""Secrets never reach logs, errors or status output."""

from __future__ import annotations

import logging

import pytest

from pgreembed.observability.redact import RedactingFilter, redact, register_secret


@pytest.mark.parametrize(("raw", "secret"), [
    ("postgresql://app:s3cr3t-pw@db:5432/app", "s3cr3t-pw"),
    ("redis://:r3dis-pw@cache:6379/0", "r3dis-pw"),
    ("host=db user=app password=kw-secret dbname=x", "kw-secret"),
    ("host=db password='quoted secret' dbname=x", "quoted secret"),
    ("Incorrect API key provided: sk-proj-abcdef123456", "sk-proj-abcdef123456"),
    ("Authorization: Bearer abcdefghijklmnop", "abcdefghijklmnop"),
])
def test_redact_masks_known_shapes(raw: str, secret: str) -> None:
    cleaned = redact(raw)
    assert secret not in cleaned
    assert "***" in cleaned


def test_registered_secret_masked_verbatim() -> None:
    register_secret("plain-token-without-shape")
    assert redact("key=plain-token-without-shape!") == "key=***!"


def test_logging_filter_redacts_messages_and_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("pgreembed.test")
    caplog.handler.addFilter(RedactingFilter())
    try:
        raise RuntimeError("connect postgresql://u:tb-secret@h/db failed")
    except RuntimeError:
        logger.exception("dsn %s", "postgresql://u:arg-secret@h/db")
    text = caplog.text
    assert "tb-secret" not in text and "arg-secret" not in text
    assert "postgresql://u:***@h/db" in text


def test_json_log_lines_are_redacted(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json
    import os
    import subprocess
    import sys

    script = ("import logging; from pgreembed.observability.logs import setup_logging;"
              " setup_logging();"
              " logging.getLogger('x').warning('dsn %s', 'postgresql://u:pw-in-json@h/db')")
    env = {**os.environ, "PGREEMBED_LOG_FORMAT": "json"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, check=True).stderr.strip()
    entry = json.loads(out)
    assert entry["level"] == "WARNING" and entry["logger"] == "x"
    assert entry["message"] == "dsn postgresql://u:***@h/db"
