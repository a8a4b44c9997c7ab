"""A finished job's model for deployment: its rendered predictions, and verified TorchScript / ONNX exports.

Predictions are rendered by the run itself (`predictions/` in its folder: the first validation images,
the teacher's too for a distill job). An export runs `python -m icd_cli export` in a child process of
the API (torch never loads into the API process); its state is `exports/<format>.json` beside the
file, and the file is downloadable like a checkpoint once it has passed verification.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, HTTPException, status
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from api.auth import UNAUTHORIZED, Caller, get_caller
from api.deps import JobId, get_app_settings, get_artifacts, get_session, job_or_404
from api.schemas import ErrorOut, json_error
from store.artifacts import ArtifactStore
from store.models import Job
from store.results import final_checkpoint_path
from store.settings import Settings

router = APIRouter(prefix="/jobs", tags=["deploy"], dependencies=[Depends(get_caller)], responses=UNAUTHORIZED)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,200}$")
_SUFFIX = {"onnx": ".onnx", "torchscript": ".ts"}
_RUNNING: set[tuple[int, str]] = set()  # exports this API process is running now
_LOCK = threading.Lock()
_TIMEOUT_S = 3600


# --- predictions ------------------------------------------------------------------------------------
class PredictionImage(BaseModel):
    name: str
    url: str
    raw_url: str | None = Field(None, description="The same image without boxes (runs since raw images are kept).")


class PredictionsOut(BaseModel):
    """A job's detections on its first validation images, as PNGs (and COCO-format JSON)."""

    model: list[PredictionImage] = Field(description="The job's model (the student of a distill job).")
    teacher: list[PredictionImage] = Field(description="The teacher's, on the same images (distill jobs).")
    detections_url: str | None = Field(description="COCO-format detections of the job's model.")
    teacher_detections_url: str | None = Field(None, description="The teacher's, on the same images.")


def _pngs(folder: Path, url: str) -> list[PredictionImage]:
    if not folder.is_dir():
        return []
    return [
        PredictionImage(
            name=p.name,
            url=f"{url}/{p.name}",
            raw_url=f"{url}/raw/{p.name}" if (folder / "raw" / p.name).is_file() else None,
        )
        for p in sorted(folder.glob("*.png"))
    ]


def _json_url(folder: Path, url: str) -> str | None:
    return f"{url}/detections.json" if (folder / "detections.json").is_file() else None


@router.get("/{job_id}/predictions", response_model=PredictionsOut, responses={404: {"model": ErrorOut}})
def job_predictions(
    job_id: JobId,
    s: Session = Depends(get_session),
    caller: Caller = Depends(get_caller),
    artifacts: ArtifactStore = Depends(get_artifacts),
) -> PredictionsOut:
    """The rendered predictions of a finished train/distill job (empty lists before it finishes)."""
    job_or_404(s, job_id, caller)
    folder = artifacts.job_dir(job_id) / "predictions"
    base = f"/jobs/{job_id}/predictions"
    return PredictionsOut(
        model=_pngs(folder, base),
        teacher=_pngs(folder / "teacher", f"{base}/teacher"),
        detections_url=_json_url(folder, base),
        teacher_detections_url=_json_url(folder / "teacher", f"{base}/teacher"),
    )


def _prediction_file(artifacts: ArtifactStore, job_id: int, parts: list[str]) -> FileResponse:
    if not all(_NAME.match(p) for p in parts):
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no prediction file {'/'.join(parts)!r}")
    path = artifacts.job_dir(job_id) / "predictions" / Path(*parts)
    if not path.is_file() or path.suffix not in (".png", ".json"):
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            detail=f"job {job_id} has no prediction file {'/'.join(parts)!r} (it renders them "
            "when it finishes; see GET /jobs/{id}/predictions)",
        )
    return FileResponse(path, media_type="image/png" if path.suffix == ".png" else "application/json")


_FILE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"image/png": {}, "application/json": {}}, "description": "The PNG or the detections JSON"},
    404: {"model": ErrorOut},
}


@router.get("/{job_id}/predictions/teacher/raw/{name}", response_class=FileResponse, responses=_FILE_RESPONSES)
def teacher_raw_prediction_file(
    job_id: JobId,
    name: str,
    s: Session = Depends(get_session),
    caller: Caller = Depends(get_caller),
    artifacts: ArtifactStore = Depends(get_artifacts),
) -> FileResponse:
    """One of the teacher's validation images without boxes (a viewer draws them from the JSON)."""
    job_or_404(s, job_id, caller)
    return _prediction_file(artifacts, job_id, ["teacher", "raw", name])


@router.get("/{job_id}/predictions/raw/{name}", response_class=FileResponse, responses=_FILE_RESPONSES)
def raw_prediction_file(
    job_id: JobId,
    name: str,
    s: Session = Depends(get_session),
    caller: Caller = Depends(get_caller),
    artifacts: ArtifactStore = Depends(get_artifacts),
) -> FileResponse:
    """One validation image without boxes (a viewer draws them from detections.json)."""
    job_or_404(s, job_id, caller)
    return _prediction_file(artifacts, job_id, ["raw", name])


@router.get("/{job_id}/predictions/teacher/{name}", response_class=FileResponse, responses=_FILE_RESPONSES)
def teacher_prediction_file(
    job_id: JobId,
    name: str,
    s: Session = Depends(get_session),
    caller: Caller = Depends(get_caller),
    artifacts: ArtifactStore = Depends(get_artifacts),
) -> FileResponse:
    """One of the teacher's rendered validation images (distill jobs)."""
    job_or_404(s, job_id, caller)
    return _prediction_file(artifacts, job_id, ["teacher", name])


@router.get("/{job_id}/predictions/{name}", response_class=FileResponse, responses=_FILE_RESPONSES)
def prediction_file(
    job_id: JobId,
    name: str,
    s: Session = Depends(get_session),
    caller: Caller = Depends(get_caller),
    artifacts: ArtifactStore = Depends(get_artifacts),
) -> FileResponse:
    """One rendered validation image (PNG), or `detections.json`."""
    job_or_404(s, job_id, caller)
    return _prediction_file(artifacts, job_id, [name])


# --- exports ----------------------------------------------------------------------------------------
class ExportRequest(BaseModel):
    model_config = {"extra": "forbid"}

    format: Literal["onnx", "torchscript"] = "onnx"
    verify_images: int = Field(4, ge=1, le=100, description="Validation images whose detections must match eager.")
    eval_images: int | None = Field(None, ge=1, description="Limit the COCO AP check (default: the whole val set).")


class ExportOut(BaseModel):
    format: str
    status: str = Field(description="running | succeeded | failed")
    error: str | None = None
    url: str | None = Field(None, description="Download URL once it succeeded.")
    sha256: str | None = None
    size_bytes: int | None = None
    started_at: float | None = None
    finished_at: float | None = None
    meta: dict[str, Any] | None = Field(None, description="The export's embedded metadata, with its verification.")


def _export_dir(artifacts: ArtifactStore, job_id: int) -> Path:
    return artifacts.job_dir(job_id) / "exports"


def _write_state(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state))
    tmp.replace(path)


def _read_state(artifacts: ArtifactStore, job_id: int, fmt: str) -> ExportOut | None:
    path = _export_dir(artifacts, job_id) / f"{fmt}.json"
    if not path.is_file():
        return None
    state = json.loads(path.read_text())
    if state["status"] == "running" and not _still_running(state, job_id, fmt):
        state.update(status="failed", error="interrupted: the API process running this export stopped; POST again")
    out = ExportOut.model_validate({k: v for k, v in state.items() if k in ExportOut.model_fields})
    if out.status == "succeeded":
        out.url = f"/jobs/{job_id}/exports/{fmt}/file"
    return out


def _still_running(state: dict[str, Any], job_id: int, fmt: str) -> bool:
    """Ours and in flight, or another live API process's on this host (a lost process reads as failed)."""
    if state.get("host") != socket.gethostname():
        return time.time() - float(state.get("started_at") or 0) < _TIMEOUT_S
    if state.get("pid") == os.getpid():
        return (job_id, fmt) in _RUNNING
    try:
        os.kill(int(state["pid"]), 0)
    except (OSError, KeyError, ValueError):
        return False
    return True


def _run_export(job_id: int, req: ExportRequest, checkpoint: Path, folder: Path, cache_dir: Path, state: dict) -> None:
    """The child process, then the final state (with the verification the export embedded)."""
    target = folder / f"model{_SUFFIX[req.format]}"
    cmd = [
        sys.executable,
        "-m",
        "icd_cli",
        "export",
        str(checkpoint),
        "--format",
        req.format,
        "-o",
        str(target),
        "--verify-images",
        str(req.verify_images),
        "--cache-dir",
        str(cache_dir),
    ]
    if req.eval_images:
        cmd += ["--eval-images", str(req.eval_images)]
    state_path = folder / f"{req.format}.json"
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=_TIMEOUT_S,
            env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
        )
        if proc.returncode == 0 and target.is_file():
            sidecar = target.with_name(target.name + ".json")  # icd_core.export.meta_sidecar
            meta = json.loads(sidecar.read_text()) if sidecar.is_file() else None
            state.update(
                status="succeeded",
                sha256=ArtifactStore.sha256_file(target),
                size_bytes=target.stat().st_size,
                meta=meta,
            )
        else:
            state.update(status="failed", error=_error_line(proc.stderr) or f"icd export exited {proc.returncode}")
    except subprocess.TimeoutExpired:
        state.update(status="failed", error=f"export took longer than {_TIMEOUT_S} s; lower eval_images")
    except Exception as exc:  # never leave the state `running`
        state.update(status="failed", error=f"{type(exc).__name__}: {exc}")
    finally:
        state["finished_at"] = time.time()
        _write_state(state_path, state)
        with _LOCK:
            _RUNNING.discard((job_id, req.format))


def _error_line(stderr: str) -> str | None:
    """click's `Error: ...` line (what icd export says to fix), else the last line."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("Error: "):
            return ln[len("Error: ") :]
    return lines[-1] if lines else None


def _exportable_checkpoint(s: Session, job: Job, settings: Settings) -> Path:
    if job.kind not in ("train", "distill"):
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            detail=f"job {job.id} is a {job.kind} job: only train and distill jobs have a model to export",
        )
    if job.status != "succeeded":
        raise HTTPException(
            status.HTTP_409_CONFLICT, detail=f"job {job.id} is {job.status}: export it once it has succeeded"
        )
    path = final_checkpoint_path(s, settings.artifact_root or "", job.id)
    if path is None or not Path(path).is_file():
        raise HTTPException(status.HTTP_409_CONFLICT, detail=f"job {job.id} has no final checkpoint file to export")
    return Path(path)


@router.post(
    "/{job_id}/exports",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=ExportOut,
    responses={
        400: {"model": ErrorOut, "description": "The body is not JSON"},
        404: {"model": ErrorOut},
        409: {"model": ErrorOut, "description": "Not exportable now"},
    },
)
def create_export(
    job_id: JobId,
    req: ExportRequest,
    s: Session = Depends(get_session),
    caller: Caller = Depends(get_caller),
    settings: Settings = Depends(get_app_settings),
    artifacts: ArtifactStore = Depends(get_artifacts),
) -> ExportOut:
    """Export a succeeded train/distill job's model (the student only) and verify it against the eager model.

    Runs in the background: poll `GET /jobs/{id}/exports/{format}` until `succeeded` (then download
    `url`) or `failed` (`error` says why: a detector or opset that cannot export, or a verification
    mismatch). POSTing again replaces a finished export; one already running answers 409.
    """
    job = job_or_404(s, job_id, caller)
    checkpoint = _exportable_checkpoint(s, job, settings)
    folder = _export_dir(artifacts, job_id)
    folder.mkdir(parents=True, exist_ok=True)
    with _LOCK:
        current = _read_state(artifacts, job_id, req.format)
        if (job_id, req.format) in _RUNNING or (current is not None and current.status == "running"):
            raise HTTPException(status.HTTP_409_CONFLICT, detail=f"a {req.format} export of job {job_id} is running")
        _RUNNING.add((job_id, req.format))
        state = {
            "format": req.format,
            "status": "running",
            "started_at": time.time(),
            "pid": os.getpid(),
            "host": socket.gethostname(),
        }
        _write_state(folder / f"{req.format}.json", state)
    thread = threading.Thread(
        target=_run_export,
        name=f"export-{job_id}-{req.format}",
        daemon=True,
        args=(job_id, req, checkpoint, folder, Path(settings.cache_dir), dict(state)),
    )
    thread.start()
    out = _read_state(artifacts, job_id, req.format)
    assert out is not None
    return out


@router.get("/{job_id}/exports", response_model=list[ExportOut], responses={404: {"model": ErrorOut}})
def list_exports(
    job_id: JobId,
    s: Session = Depends(get_session),
    caller: Caller = Depends(get_caller),
    artifacts: ArtifactStore = Depends(get_artifacts),
) -> list[ExportOut]:
    """The job's exports, one per format that was requested."""
    job_or_404(s, job_id, caller)
    return [out for fmt in _SUFFIX if (out := _read_state(artifacts, job_id, fmt)) is not None]


@router.get("/{job_id}/exports/{fmt}", response_model=ExportOut, responses={404: {"model": ErrorOut}})
def get_export(
    job_id: JobId,
    fmt: Literal["onnx", "torchscript"],
    s: Session = Depends(get_session),
    caller: Caller = Depends(get_caller),
    artifacts: ArtifactStore = Depends(get_artifacts),
) -> ExportOut:
    """One export's state, error or verification."""
    job_or_404(s, job_id, caller)
    out = _read_state(artifacts, job_id, fmt)
    if out is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"job {job_id} has no {fmt} export; POST one first")
    return out


@router.get(
    "/{job_id}/exports/{fmt}/file",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}}, 404: json_error("No such job or export")},
)
def download_export(
    job_id: JobId,
    fmt: Literal["onnx", "torchscript"],
    s: Session = Depends(get_session),
    caller: Caller = Depends(get_caller),
    artifacts: ArtifactStore = Depends(get_artifacts),
) -> FileResponse:
    """Stream a verified export (`X-Export-SHA256` / ETag to check it; HTTP ranges resume a download)."""
    job_or_404(s, job_id, caller)
    out = _read_state(artifacts, job_id, fmt)
    path = _export_dir(artifacts, job_id) / f"model{_SUFFIX[fmt]}"
    if out is None or out.status != "succeeded" or not path.is_file():
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"job {job_id} has no finished {fmt} export")
    return FileResponse(
        path,
        media_type="application/octet-stream",
        filename=f"job{job_id}{_SUFFIX[fmt]}",
        headers={"X-Export-SHA256": out.sha256 or "", "ETag": f'"{out.sha256}"'},
    )


# HEAD (size and sha256 first) is the same handler, kept out of the schema so operation ids stay unique.
router.add_api_route(
    "/{job_id}/exports/{fmt}/file",
    download_export,
    methods=["HEAD"],
    include_in_schema=False,
    response_class=FileResponse,
)
