"""What the processes tell the operator: logs (logs.py), secrets kept out of them
(redact.py), and the Prometheus metrics of both processes: the workers' counters
(worker_metrics.py) and the scheduler's gauges read from Postgres (scheduler_metrics.py).

redact.py stands on the ground floor (the store redacts its errors with it); the metrics
modules read through the core (status, throttle, store) at scrape time.
"""
