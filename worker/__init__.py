"""What `dramatiq worker` loads: the Redis broker (from $REDIS_URL), then the actors."""

from pgreembed.logs import setup_logging
from worker.broker import make_broker

setup_logging()
broker = make_broker()

from worker.actors import embed_batch  # noqa: E402  (actors bind to the broker set above)

__all__ = ["broker", "embed_batch"]
