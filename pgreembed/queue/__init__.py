"""The contract between the scheduler and the workers: queue and actor names, the
message's shape, the broker, in-flight claims in Redis and the backlog's freshness."""
