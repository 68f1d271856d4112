"""The worker process's Settings: read once, shared by the broker, the actor and the warm-up.

A message may name a target added to the config after this process started (the scheduler
or a `tick` cronjob restarted with the new config, the workers not): `knowing` re-reads the
config once for it, so a new target needs no worker restart. Other changes of the config
(Redis URL, pool sizes) still take a restart: the broker and the pools were built from the
first read.
"""

from __future__ import annotations

import logging
import threading

from pgreembed.config import Settings, load_settings
from pgreembed.errors import ConfigError

log = logging.getLogger(__name__)

_lock = threading.Lock()
_current: Settings | None = None


def settings() -> Settings:
    """Read once per worker process, from $PGREEMBED_CONFIG and the environment."""
    global _current
    with _lock:
        if _current is None:
            _current = load_settings()
        return _current


def knowing(target: str) -> Settings:
    """The settings, re-read when they lack `target` (a config that no longer loads keeps
    the settings this process has: its messages then fail as unknown, and are retried)."""
    global _current
    current = settings()
    if target in current.targets:
        return current
    try:
        reloaded = load_settings()
    except ConfigError as error:
        log.warning("target %r is not in this worker's config, and re-reading the config"
                    " failed: %s", target, error)
        return current
    if target not in reloaded.targets:
        return current
    log.info("target %r was added to the config: re-read it", target)
    with _lock:
        _current = reloaded
    return reloaded
