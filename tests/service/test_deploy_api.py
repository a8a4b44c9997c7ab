"""The deployment endpoints on a real run: model cost in GET /jobs/{id}, rendered predictions, and an
ONNX export submitted as an export job, run by the worker's code (in-process here), verified, and
downloadable with its sha256."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from icd_core.runner import run_spec
from icd_core.spec import parse_spec
from store.artifacts import ArtifactStore
from store.db import make_engine, session_factory
from store.jobs import claim_job, create_job, finish_job
from store.results import add_checkpoint
from store.settings import Settings, get_settings

MODEL = {
    "detector": "retinanet",
    "backbone": "resnet18",
    "fpn_channels": 32,
    "levels": ["p3", "p4", "p5"],
    "anchor_sizes": [8, 16, 32],
    "head_convs": 1,
}
SHAPES = {"format": "shapes", "image_size": 64, "min_object": 6, "max_object": 32, "max_objects": 4}
SPEC = {
    "kind": "train",
    "name": "deploy",
    "device": "cpu",
    "model": MODEL,
    "data": {
        "train": {**SHAPES, "num_images": 8, "seed": 1},
        "val": {**SHAPES, "num_images": 3, "seed": 2},
        "min_size": 64,
        "max_size": 64,
        "workers": 0,
    },
    "schedule": {"iterations": 2, "batch_size": 2, "eval_every": 0, "checkpoint_every": 0},
    "deploy": {"latency_repeats": 2, "latency_warmup": 0, "exported_latency": False, "prediction_images": 2},
}


def _finished_job(settings: Settings) -> int:
    """A train job run for real into its artifact folder, recorded as the worker records it."""
    engine = make_engine(settings.database_url)
    artifacts = ArtifactStore(settings.artifact_root)
    try:
        with session_factory(engine)() as s:
            job = create_job(s, SPEC, "train", "deploy", "cpu")
            claim_job(s, job.id, "test@host", lease_s=3600)  # no heartbeat renews it here
            folder = artifacts.job_dir(job.id)
            result = run_spec(parse_spec(SPEC), folder, cache_dir=settings.cache_dir)
            ck = Path(result.final_checkpoint)
            add_checkpoint(
                s,
                job.id,
                1,
                2,
                ck.name,
                artifacts.relative(ck),
                ck.stat().st_size,
                ArtifactStore.sha256_file(ck),
                final=True,
            )
            finish_job(s, job.id, result.final_metrics)
            return job.id
    finally:
        engine.dispose()


def _run_export(client: TestClient, job_id: int, fmt: str, **body: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """POST the export, run its job as a worker does, and read the export back (submitted, finished)."""
    from worker.run_job import execute_job

    started = client.post(f"/jobs/{job_id}/exports", json={"format": fmt, **body})
    assert started.status_code == 202, started.text
    execute_job(started.json()["job_id"], "test@host")
    return started.json(), client.get(f"/jobs/{job_id}/exports/{fmt}").json()


@pytest.mark.slow
def test_cost_predictions_and_a_verified_onnx_export(api_and_worker: TestClient) -> None:
    client = api_and_worker
    job_id = _finished_job(get_settings())

    job = client.get(f"/jobs/{job_id}").json()
    cost = job["model_cost"]["model"]
    assert cost["params_m"] > 0 and cost["gflops"] > 0 and cost["latency_ms"] > 0 and "teacher" not in job["model_cost"]
    assert job["final_metrics"]["cost_gflops"] == cost["gflops"]

    preds = client.get(f"/jobs/{job_id}/predictions").json()
    assert len(preds["model"]) == 2 and preds["teacher"] == [] and preds["detections_url"]
    png = client.get(preds["model"][0]["url"])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(png.content)) as im:
        assert im.size == (64, 64)
    detections = client.get(preds["detections_url"]).json()
    assert detections["images"][0]["width"] == 64 and detections["info"]["drawn_score_min"] == 0.3
    raw = client.get(preds["model"][0]["raw_url"])  # the image without boxes, for a viewer that draws them
    with Image.open(io.BytesIO(raw.content)) as im:
        assert raw.headers["content-type"] == "image/png" and im.size == (64, 64)
    assert client.get(f"/jobs/{job_id}/predictions/..%2Fsummary.json").status_code == 404
    assert client.get(f"/jobs/{job_id}/predictions/nope.png").status_code == 404

    assert client.get(f"/jobs/{job_id}/exports").json() == []
    started = client.post(f"/jobs/{job_id}/exports", json={"format": "onnx", "eval_images": 2})
    assert started.status_code == 202 and started.json()["status"] == "queued"
    export_id = started.json()["job_id"]
    again = client.post(f"/jobs/{job_id}/exports", json={"format": "onnx"})
    assert again.status_code == 409 and f"is queued (job {export_id})" in again.json()["detail"]  # one at a time
    export_job = client.get(f"/jobs/{export_id}").json()  # an export is a job like any other
    assert export_job["kind"] == "export" and export_job["spec"]["checkpoint"] == f"job:{job_id}"

    from worker.run_job import execute_job

    assert execute_job(export_id, "test@host") == "succeeded"
    done = client.get(f"/jobs/{job_id}/exports/onnx").json()
    assert done["status"] == "succeeded" and done["job_id"] == export_id, done
    assert done["meta"]["verification"]["eval_images"] == 2 and done["meta"]["format"] == "onnx"
    assert done["meta"]["class_names"] and done["meta"]["source_spec"]["name"] == "deploy"
    file = client.get(done["url"])
    assert file.status_code == 200 and hashlib.sha256(file.content).hexdigest() == done["sha256"]
    assert file.headers["x-export-sha256"] == done["sha256"] and len(file.content) == done["size_bytes"]
    assert [e["format"] for e in client.get(f"/jobs/{job_id}/exports").json()] == ["onnx"]
    finished = client.get(f"/jobs/{export_id}").json()
    assert finished["status"] == "succeeded" and finished["final_metrics"]["onnx_size_mb"] > 0


def test_export_requests_that_cannot_work_say_why(client: TestClient, settings: Settings) -> None:
    engine = make_engine(settings.database_url)
    with session_factory(engine)() as s:
        queued = create_job(s, SPEC, "train", "queued", "cpu").id
    engine.dispose()
    r = client.post(f"/jobs/{queued}/exports", json={"format": "onnx"})
    assert r.status_code == 409 and "is queued: export it once it has succeeded" in r.json()["detail"]
    r = client.post(f"/jobs/{queued}/exports", json={"format": "tflite"})
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "format"
    r = client.post(f"/jobs/{queued}/exports", json={"format": "onnx", "verify_images": 0})
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "verify_images"
    assert client.post("/jobs/999999/exports", json={}).status_code == 404
    assert client.get(f"/jobs/{queued}/exports/onnx").status_code == 404
    assert client.get(f"/jobs/{queued}/exports/onnx/file").status_code == 404
    assert client.get(f"/jobs/{queued}/predictions").json() == {
        "model": [],
        "teacher": [],
        "detections_url": None,
        "teacher_detections_url": None,
    }


def test_study_report_serves_cost_columns_and_the_ap_latency_plot(client: TestClient, settings: Settings) -> None:
    from icd_core.leaderboard import write_report

    engine = make_engine(settings.database_url)
    with session_factory(engine)() as s:
        study_id = create_job(s, {"kind": "study"}, "study", "s", "cpu").id
    engine.dispose()
    costs = {"cost_latency_ms": 10.0, "cost_gflops": 1.0, "teacher_cost_latency_ms": 20.0, "teacher_cost_gflops": 3.0}
    rows = [{"method": "none", "seed": 0, "metrics": {"AP": 5.0, **costs}}]
    write_report(rows, ArtifactStore(settings.artifact_root).job_dir(study_id) / "report", teacher={"AP": 10.0})
    md = client.get(f"/jobs/{study_id}/report.md").text
    assert "vs teacher" in md and "2.0× faster, 1/3 the FLOPs, 50 % of the teacher's AP" in md
    png = client.get(f"/jobs/{study_id}/report/ap_latency.png")
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_a_failed_export_reads_as_failed_with_the_reason(api_and_worker: TestClient) -> None:
    client = api_and_worker
    job_id = _finished_job(get_settings())
    folder = ArtifactStore(get_settings().artifact_root).job_dir(job_id)
    final = folder / "checkpoints" / "final.pt"
    good = final.read_bytes()
    final.write_bytes(b"not a checkpoint")  # the file the export reads
    _, failed = _run_export(client, job_id, "torchscript")
    assert failed["status"] == "failed" and failed["url"] is None and "final.pt" in failed["error"], failed
    assert client.get(f"/jobs/{job_id}/exports/torchscript/file").status_code == 404

    # POSTing again after a failure submits a new export job, which the fixed file lets succeed.
    final.write_bytes(good)
    started, done = _run_export(client, job_id, "torchscript")
    assert started["job_id"] != failed["job_id"] and done["status"] == "succeeded", done
    assert client.get(f"/jobs/{job_id}/exports/torchscript/file").status_code == 200
