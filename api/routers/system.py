"""Service-level endpoints: workers, health, version, and the dashboard page."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse
from sqlalchemy import text
from sqlalchemy.orm import Session

from api.auth import UNAUTHORIZED, Caller, get_caller
from api.deps import get_app_settings, get_session
from api.schemas import CheckResult, HealthOut, QuotaOut, VersionOut, WorkerOut
from store.db import current_revision
from store.dispatch import check_broker
from store.jobs import get_job
from store.reaper import unservable_warnings
from store.settings import Settings
from store.tokens import list_tokens, usage
from store.workers import list_workers

router = APIRouter(tags=["system"])
STATIC = Path(__file__).resolve().parent.parent / "static"
REPO = Path(__file__).resolve().parents[2]


def _alive_window(settings: Settings) -> float:
    """A worker is alive if it beat within three heartbeat intervals."""
    return 3 * settings.worker_heartbeat_s


@router.get("/workers", response_model=list[WorkerOut], responses=UNAUTHORIZED)
def workers(
    s: Session = Depends(get_session),
    settings: Settings = Depends(get_app_settings),
    caller: Caller = Depends(get_caller),
) -> list[WorkerOut]:
    """Live workers: host, device, queues and the job each is running (null where that job is another
    owner's: a non-admin token sees that a worker is busy, not whose job it runs)."""
    out = [WorkerOut.model_validate(w) for w in list_workers(s, _alive_window(settings))]
    if caller.admin:
        return out
    hidden = []
    for w in out:
        job = get_job(s, w.current_job_id) if w.current_job_id is not None else None
        hidden.append(w if job is not None and caller.can_see(job) else w.model_copy(update={"current_job_id": None}))
    return hidden


@router.get("/quotas", response_model=list[QuotaOut], responses=UNAUTHORIZED)
def quotas(s: Session = Depends(get_session), caller: Caller = Depends(get_caller)) -> list[QuotaOut]:
    """Every token's quotas and what its jobs hold now (an admin); a non-admin token sees its own row.
    Quotas hold queued jobs back (the job's status_detail says which), they never refuse a submit."""
    used = usage(s)
    rows = []
    for t in list_tokens(s):
        if not caller.admin and t.name != caller.name:
            continue
        running, devices, queued = used.get(t.name, (0, 0, 0))
        rows.append(
            QuotaOut(
                name=t.name,
                admin=t.admin,
                max_running=t.max_running,
                max_gpus=t.max_gpus,
                max_priority=t.max_priority,
                running=running,
                devices=devices,
                queued=queued,
            )
        )
    return rows


@router.get("/health", response_model=HealthOut, responses={503: {"model": HealthOut}})
def health(s: Session = Depends(get_session), settings: Settings = Depends(get_app_settings)) -> JSONResponse:
    """Database, broker and workers, each reported. 200 'ok' or 'degraded'; 503 when the database is down."""
    try:
        s.execute(text("SELECT 1"))
        db = CheckResult(ok=True, detail=s.get_bind().dialect.name)
        n = len(list_workers(s, _alive_window(settings)))
        wk = CheckResult(ok=n > 0, detail=f"{n} alive" if n else "no live worker: start one with `icd worker`")
        warnings = unservable_warnings(s, settings)
    except Exception as exc:
        db = CheckResult(ok=False, detail=f"database unreachable: {exc.__class__.__name__}: {exc}"[:500])
        wk = CheckResult(ok=False, detail="unknown (database unreachable)")
        warnings = []
    ok, detail = check_broker(settings.broker_url)
    broker = CheckResult(ok=ok, detail=detail)
    body = HealthOut(
        status="ok" if db.ok and broker.ok and wk.ok and not warnings else "degraded",
        database=db,
        broker=broker,
        workers=wk,
        warnings=warnings,
    )
    return JSONResponse(body.model_dump(), status_code=200 if db.ok else 503)


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


@lru_cache(maxsize=1)
def _git_commit() -> str | None:
    if os.environ.get("ICD_GIT_COMMIT"):
        return os.environ["ICD_GIT_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=2, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


@router.get("/version", response_model=VersionOut)
def version(s: Session = Depends(get_session)) -> VersionOut:
    """Package version, git commit, Python and torch versions (torch is not imported), schema revision."""
    try:
        rev = current_revision(s.get_bind())  # type: ignore[arg-type]
    except Exception:
        rev = None
    return VersionOut(
        version=_dist_version("icd-service") or "0+unknown",
        git_commit=_git_commit(),
        python=platform.python_version(),
        torch=_dist_version("torch"),
        database_revision=rev,
    )


@router.get("/", include_in_schema=False)
def dashboard() -> FileResponse:
    """The dashboard: one static page; its routes (#/jobs/12, #/compare?ids=...) live in the URL hash."""
    return FileResponse(STATIC / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})


@router.get("/ui", include_in_schema=False)
def old_dashboard() -> RedirectResponse:
    """Where the dashboard used to be: bookmarks keep working."""
    return RedirectResponse("/")
