"""Every environment variable pgreembed reads, declared once (name, default, what it does).

Nothing outside `pgreembed.config` reads `os.environ` (tests/test_architecture.py checks
it): the processes' settings come from `Settings` (`parse_settings` reads the variables
below that belong to it from the mapping it is given), and the few read before any config
is loaded, or by the CLI's terminal output, are read here, at call time, so a process sees
its environment as it was started with.

To add one: declare an `EnvVar` below and read it with `.get()`; document it in
docs/configuration.md (or docs/operations.md for the metrics ports).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pgreembed.config.fields import positive
from pgreembed.errors import ConfigError


@dataclass(frozen=True)
class EnvVar:
    """One environment variable; `default` when it is unset (as `os.environ.get`)."""

    name: str
    default: Any = None

    def get(self, env: Mapping[str, str] | None = None) -> Any:
        """Its value in `env` (default: this process's environment)."""
        return (os.environ if env is None else env).get(self.name, self.default)

    def is_set(self, env: Mapping[str, str] | None = None) -> bool:
        """Set and not empty."""
        return bool((os.environ if env is None else env).get(self.name))

    def positive_int(self, env: Mapping[str, str] | None = None, default: int = 1) -> int:
        """A positive integer (unset or empty: `default`), or a ConfigError naming it."""
        env = os.environ if env is None else env
        try:
            return positive(int(env.get(self.name) or default), self.name)
        except ValueError:
            raise ConfigError(f"{self.name}: must be a positive integer, got"
                              f" {env[self.name]!r}") from None


    def non_negative_int(self, env: Mapping[str, str] | None = None) -> int:
        """An integer >= 0 (unset or empty: its default), or a ConfigError naming it."""
        env = os.environ if env is None else env
        raw = env.get(self.name) or self.default
        try:
            value = int(raw)
        except (TypeError, ValueError):
            value = -1
        if value < 0:
            raise ConfigError(f"{self.name}: must be an integer >= 0, got {raw!r}")
        return value


# Where things are, and the secrets (Settings; the config file may give the URLs too).
CONFIG = EnvVar("PGREEMBED_CONFIG")
DATABASE_URL = EnvVar("DATABASE_URL")
REDIS_URL = EnvVar("REDIS_URL")
OPENAI_API_KEY = EnvVar("OPENAI_API_KEY")
OPENAI_BASE_URL = EnvVar("OPENAI_BASE_URL")
# The providers' endpoints and keys (docs/providers.md), read by each provider module
# when it is built; AWS and Google default credentials come from their own chains.
AZURE_OPENAI_ENDPOINT = EnvVar("AZURE_OPENAI_ENDPOINT")
AZURE_OPENAI_API_KEY = EnvVar("AZURE_OPENAI_API_KEY")
AZURE_OPENAI_AD_TOKEN = EnvVar("AZURE_OPENAI_AD_TOKEN")
OPENAI_API_VERSION = EnvVar("OPENAI_API_VERSION")
CO_API_URL = EnvVar("CO_API_URL")
CO_API_KEY = EnvVar("CO_API_KEY")
COHERE_API_KEY = EnvVar("COHERE_API_KEY")
VOYAGE_API_KEY = EnvVar("VOYAGE_API_KEY")
GEMINI_API_KEY = EnvVar("GEMINI_API_KEY")
GOOGLE_API_KEY = EnvVar("GOOGLE_API_KEY")
GOOGLE_CLOUD_PROJECT = EnvVar("GOOGLE_CLOUD_PROJECT")
GOOGLE_CLOUD_LOCATION = EnvVar("GOOGLE_CLOUD_LOCATION")
# Dramatiq's Redis broker (Settings.heartbeat_ms, Settings.maintenance_chance: defaults there).
HEARTBEAT_MS = EnvVar("PGREEMBED_HEARTBEAT_MS")
MAINTENANCE_CHANCE = EnvVar("PGREEMBED_MAINTENANCE_CHANCE")

# Logging, set up before any config is read (pgreembed.observability.logs).
LOG_LEVEL = EnvVar("PGREEMBED_LOG_LEVEL", "INFO")
LOG_FORMAT = EnvVar("PGREEMBED_LOG_FORMAT", "")  # "json": one JSON object per line
# The CLI's progress display: bar, lines or quiet (default: a bar on a terminal).
PROGRESS = EnvVar("PGREEMBED_PROGRESS", "")
# onnxruntime threads of the local model (0: onnxruntime's own choice).
LOCAL_THREADS = EnvVar("PGREEMBED_LOCAL_THREADS", "0")
# Metrics: the scheduler's exposition server, and Dramatiq's exporter of the workers'
# (its own variable, read by Dramatiq's middleware too).
SCHEDULER_METRICS_PORT = EnvVar("PGREEMBED_SCHEDULER_METRICS_PORT")
METRICS_HOST = EnvVar("PGREEMBED_METRICS_HOST", "0.0.0.0")
WORKER_METRICS_PORT = EnvVar("dramatiq_prom_port")
# A test hook: SIGKILL right after a migration step's commit (pgreembed.migrations.crash_point).
CRASH_AT = EnvVar("PGREEMBED_CRASH_AT")


def child_environment(**overrides: str) -> dict[str, str]:
    """This process's environment plus `overrides`, for a process it starts (the demo's)."""
    return {**os.environ, **overrides}


def process_environment() -> Mapping[str, str]:
    """This process's environment, for `load_settings` to read its variables from."""
    return os.environ
