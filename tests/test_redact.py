"""Secrets never reach logs, errors or status output."""

from __future__ import annotations

import logging

import pytest

from pgreembed.redact import RedactingFilter, redact, register_secret


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
