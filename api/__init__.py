"""HTTP API (FastAPI): routers, schemas, auth, offline docs and the dashboard page."""
