"""Which requests/tokens-per-minute budget applies to the model being called.

Providers limit an account per model, so a budget belongs to the model, not to
the column it fills: a migration to text-embedding-3-large is throttled by the
large model's budget, exactly when its volume is largest. Every budget that
names the model applies, and the smallest value of each limit wins:

- `[rate_limits."<model>"]` in the config;
- a target's own `requests_per_minute` / `tokens_per_minute`, for the model the
  target configures;
- the bookkeeping (`pgreembed.models`), recorded by `migrate start
  --requests-per-minute/--tokens-per-minute`, so every worker on every machine
  applies it without a config change (re-read every `refresh_seconds`).
"""

from __future__ import annotations

import logging
import threading
import time

from pgreembed.config import Budget, Settings
from pgreembed.store.budgets import recorded_budget

log = logging.getLogger(__name__)


def configured_budget(settings: Settings, provider: str, model: str) -> Budget:
    """What the config says about `model`: its rate_limits table and its targets."""
    budget = settings.rate_limits.get(model, Budget()) if provider != "local" else Budget()
    for target in settings.targets.values():
        if (target.provider, target.model) == (provider, model):
            budget = budget.tighter(Budget(target.requests_per_minute, target.tokens_per_minute))
    return budget


class ModelBudget:
    """One model's budget as a worker sees it: the config, tightened by the bookkeeping.

    The bookkeeping is re-read every `refresh_seconds` by one thread at a time (the
    others use the last value meanwhile); while Postgres cannot be read, the last
    value read stays in force.
    """

    def __init__(self, settings: Settings, provider: str, model: str,
                 refresh_seconds: float = 10.0) -> None:
        self._settings = settings
        self._provider = provider
        self._model = model
        self._configured = configured_budget(settings, provider, model)
        self._recorded = Budget()
        self._refresh_seconds = refresh_seconds
        self._read_at: float | None = None
        self._lock = threading.Lock()

    def current(self) -> Budget:
        if self._read_at is None:  # the first read: every thread waits for it
            with self._lock:
                if self._read_at is None:
                    self._refresh()
        elif (time.monotonic() - self._read_at >= self._refresh_seconds
              and self._lock.acquire(blocking=False)):  # others go on with the last value
            try:
                self._refresh()
            finally:
                self._lock.release()
        return self._configured.tighter(self._recorded)

    def _refresh(self) -> None:
        from pgreembed.store.pool import worker_pool

        try:
            pool = worker_pool(self._settings)
            with pool.connection(timeout=5) as conn:
                self._recorded = recorded_budget(conn, self._provider, self._model)
        except Exception as exc:  # noqa: BLE001 - keep the last budget read, say why
            from pgreembed.observability.redact import redact

            log.warning("rate limit %s: cannot read its recorded budget (%s); keeping %s",
                        self._model, redact(str(exc)), self._recorded)
        self._read_at = time.monotonic()
