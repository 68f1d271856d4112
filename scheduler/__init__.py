"""The scheduler: finds pending rows and enqueues them (continuous service or one tick)."""
