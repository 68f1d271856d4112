"""Pay each worker process's start-up costs at boot, not on its first message.

Without this, the first message of every process imports `openai`, loads the
tiktoken encoding (or the local ONNX model) and opens the pool while the
process's other threads wait on the same locks: ~35% of all worker CPU in a
20k-row run, and ~3 s before the first vector. A failure here only logs: the
first message then pays the cost (and reports the error) as it would anyway.
"""

from __future__ import annotations

import logging

import dramatiq
from dramatiq.middleware import Middleware

from pgreembed.observability.redact import redact

log = logging.getLogger(__name__)


class WarmUp(Middleware):
    """Builds every configured target's provider and the pool in each worker process."""

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        from pgreembed.embedding.providers import make_provider
        from pgreembed.store.pool import worker_pool
        from worker.settings import settings

        try:
            config = settings()
            worker_pool(config)
            for target in config.targets.values():
                provider = make_provider(config, target.provider, target.model,
                                         target.dimensions)
                provider.count_tokens(["warm-up"])  # loads the tokenizer / model files
        except Exception as exc:  # noqa: BLE001 - the first message reports it properly
            log.warning("worker warm-up skipped: %s", redact(str(exc)))
