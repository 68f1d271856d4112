"""Doctor's view of `[throttle]`: what is configured, the pace every worker is held to
now (the shared Redis keys), and in adaptive mode the probe query timed once here."""

from __future__ import annotations

import redis

from pgreembed.embedding.throttle import Throttle, observe
from pgreembed.operations.doctor.base import DoctorBase
from pgreembed.operations.doctor.findings import OK, WARN
from pgreembed.store.load import sample_load


class ThrottleChecks(DoctorBase):
    def throttle(self) -> None:
        config = self.settings.throttle
        client = redis.Redis.from_url(self.settings.redis_url, socket_connect_timeout=2,
                                      socket_timeout=2)
        state = observe(config, client)
        details: dict[str, object] = state.as_dict()
        level, message = OK, state.line()
        if config.adaptive:
            # A probe slower than max_probe_ms right now keeps every worker at the slowest
            # pace (10% of the cap) for as long as it lasts: say so, and how slow it is.
            sample = sample_load(self.conn, config.probe_sql,
                                 max(1, int(10 * config.max_probe_ms)), read_only=True)
            details.update(probe_ms=round(sample.probe_seconds * 1000, 1),
                           active_others=sample.active_others)
            why = Throttle(config, client).overloaded(sample)
            if why:
                level = WARN
                message += (f"; now {why}: the throttle holds the backfill at its slowest"
                            " while that lasts (raise max_probe_ms / max_active, or pick a"
                            " cheaper probe_sql)")
            else:
                message += (f"; the probe took {sample.probe_seconds * 1000:.1f} ms here,"
                            f" {sample.active_others} active queries of other clients")
        self.add(level, None, "throttle", message, details)
