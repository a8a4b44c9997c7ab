"""The FastAPI application: `create_app(settings)`; `uvicorn api.main:app` builds it from ICD_* env.

Startup stays fast: no torch, no Celery worker code; the broker client is created on first submit.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as SATimeoutError
from sqlalchemy.orm import Session

from api.auth import check_exposure
from api.docs import install_offline_docs
from api.guard import RequestGuard
from api.periodic import PeriodicTask, install_periodic
from api.routers import artifacts, deploy, jobs, reports, sweeps, system
from api.routers.system import STATIC
from icd_core.spec import DATA_FORMATS
from store.artifacts import ArtifactStore
from store.db import ensure_migrated, make_engine, session_factory, upgrade_database
from store.dispatch import enqueue
from store.models import JOB_KINDS
from store.reaper import reap_and_send
from store.settings import Settings, get_settings

log = logging.getLogger(__name__)
_FIELD_IN_MSG = re.compile(r"^(?:Value error, )?([a-z_][\w.]*): ")


def _dotted_field(err: dict[str, Any]) -> str:
    """The spec field an error is about, e.g. 'teacher.checkpoint', without the 'body' prefix or the
    union's tag. Model-level validators name their field at the start of the message instead."""
    loc = [str(x) for x in err.get("loc", ())]
    if loc and loc[0] == "body":
        loc = loc[1:]
    if loc and loc[0] in JOB_KINDS:  # discriminated-union tag, not a field
        loc = loc[1:]
    if len(loc) >= 2 and loc[0] == "base" and loc[1] in JOB_KINDS:  # a sweep's base spec: its tag too
        loc = loc[:1] + loc[2:]
    if len(loc) >= 3 and loc[0] == "data" and loc[2] in DATA_FORMATS:  # the data source's tag
        loc = loc[:2] + loc[3:]
    if err.get("type") in ("union_tag_invalid", "union_tag_not_found"):
        tag = str((err.get("ctx") or {}).get("discriminator", "'kind'")).strip("'\"")
        return ".".join([*loc, tag])
    field = ".".join(loc)
    m = _FIELD_IN_MSG.match(str(err.get("msg", "")))
    if m:
        named = m.group(1)
        return named if not field or named.startswith(field) else f"{field}.{named}"
    return field


async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 listing each problem with `field` (dotted path) and `msg` (the reason)."""
    detail = []
    for err in exc.errors():
        entry = {k: v for k, v in err.items() if k in ("loc", "msg", "type")}
        entry["field"] = _dotted_field(err)
        detail.append(entry)
    return JSONResponse({"detail": detail}, status_code=422)


async def _database_unavailable(_request: Request, exc: Exception) -> JSONResponse:
    """503 with Retry-After when the database cannot be reached (a restart, a failover, a full pool): the
    client should try again, as after a broker outage, instead of reading a bare 500."""
    log.warning("database unavailable: %s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    detail = f"the database is unavailable ({type(exc).__name__}); try again in a few seconds"
    return JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": "5"})


async def _method_not_allowed(request: Request, _exc: Exception) -> JSONResponse:
    """405 whose Allow header lists every documented method of the path (Starlette names only those
    of the first route that matched)."""
    path, allowed = request.url.path, []
    for template, operations in request.app.openapi()["paths"].items():
        if re.fullmatch(re.sub(r"\{[^}]+\}", "[^/]+", template), path):
            allowed = sorted(m.upper() for m in operations)
            break
    return JSONResponse({"detail": "Method Not Allowed"}, status_code=405, headers={"Allow": ", ".join(allowed)})


def create_app(settings: Settings | None = None, periodic: list[PeriodicTask] | None = None) -> FastAPI:
    """Build the app for `settings`; refuses a database that is not at the code's schema revision, and
    (StartupRefused) a server beyond loopback with no API token or no ICD_DATA_ROOTS.

    With settings.auto_migrate (the embedded `icd serve`) it migrates the database itself instead.
    `periodic` tasks run in exactly one of the API processes sharing the database (api.periodic).
    """
    settings = settings or get_settings()
    settings.ensure_dirs()
    if settings.auto_migrate:
        upgrade_database(settings.database_url)
    engine = make_engine(settings.database_url)
    try:
        ensure_migrated(engine)
        with session_factory(engine)() as s:
            check_exposure(settings, s)
    except Exception:
        engine.dispose()
        raise

    app = FastAPI(
        title="ICD distillation service",
        version=_version(),
        description=(
            "Submit detector training and distillation jobs, watch their progress, read metrics and COCO mAP, "
            "download checkpoints. Dashboard at [/](/); the same reference as [ReDoc](/redoc)."
        ),
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessions = session_factory(engine)
    app.state.artifacts = ArtifactStore(settings.artifact_root)
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(405, _method_not_allowed)
    for unavailable in (OperationalError, InterfaceError, DisconnectionError, SATimeoutError):
        app.add_exception_handler(unavailable, _database_unavailable)
    app.add_middleware(RequestGuard, max_body_bytes=settings.max_body_bytes)
    app.include_router(jobs.router)
    app.include_router(artifacts.router)
    app.include_router(deploy.router)
    app.include_router(reports.router)
    app.include_router(sweeps.router)
    app.include_router(system.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    install_offline_docs(app)
    install_periodic(app, _reaper_task(settings) + list(periodic or []))
    return app


def _reaper_task(settings: Settings) -> list[PeriodicTask]:
    """The API reaps expired leases too (so an API whose workers all died still resumes their jobs once
    a worker is back, and reports what it did), as periodic work: once across all API processes."""
    if settings.reaper_interval_s <= 0:
        return []

    def reap(s: Session) -> None:
        reap_and_send(s, settings, lambda job_id, queue: enqueue(job_id, queue, settings.broker_url))

    return [PeriodicTask("reaper", settings.reaper_interval_s, reap)]


def _version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("icd-service")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def __getattr__(name: str) -> Any:
    """`api.main:app` is built on first access, from the environment (keeps `import api.main` cheap)."""
    if name == "app":
        built = create_app()
        globals()["app"] = built
        return built
    raise AttributeError(name)
