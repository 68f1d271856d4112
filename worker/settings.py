"""The worker process's Settings: read once, shared by the broker, the actor and the warm-up."""

from __future__ import annotations

import functools

from pgreembed.config import Settings, load_settings


@functools.cache
def settings() -> Settings:
    """Read once per worker process, from $PGREEMBED_CONFIG and the environment."""
    return load_settings()
