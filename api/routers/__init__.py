"""API routers: jobs, artifacts (checkpoints, logs) and system (workers, health, version, UI)."""
