"""Celery wiring: device pinning, claiming, leases, model caching."""
