"""What `dramatiq worker` loads: the Redis broker (from Settings), then the actors."""

from pgreembed.observability.logs import setup_logging
from worker.broker import worker_broker
from worker.settings import settings

setup_logging()
broker = worker_broker(settings())

from worker.actors import (  # noqa: E402  (actors bind to the broker set above)
    chunk_parents,
    embed_batch,
)

__all__ = ["broker", "chunk_parents", "embed_batch"]
