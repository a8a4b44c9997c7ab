"""A job's error names what to fix, and training is never lost to evaluation: a bad validation image
fails the job with the image's path and id, after final.pt was written, so a retry does not start over."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import select

from store.db import make_engine
from store.models import Metric
from store.settings import get_settings

MINI = Path(__file__).resolve().parents[1] / "fixtures" / "coco_mini"
MODEL = {
    "detector": "retinanet",
    "backbone": "resnet18",
    "fpn_channels": 32,
    "levels": ["p3", "p4", "p5"],
    "head_convs": 1,
}


def _coco_job(train: str, val: str, iterations: int = 2) -> dict[str, Any]:
    return {
        "kind": "train",
        "name": "coco-errors",
        "device": "cpu",
        "model": MODEL,
        "data": {
            "train": {"format": "coco", "images": f"{train}/images", "annotations": f"{train}/instances.json"},
            "val": {"format": "coco", "images": f"{val}/images", "annotations": f"{val}/instances.json"},
            "min_size": 64,
            "max_size": 96,
            "workers": 1,
        },
        "schedule": {"iterations": iterations, "batch_size": 2, "eval_every": 0, "checkpoint_every": 0},
    }


def test_a_bad_validation_image_fails_the_job_by_name_after_final_pt(
    api_and_worker: TestClient, tmp_path: Path
) -> None:
    from worker.run_job import execute_job

    data = tmp_path / "data"
    shutil.copytree(MINI, data / "train")
    shutil.copytree(MINI, data / "val")
    bad = data / "val" / "images" / "000000000250.jpg"
    bad.write_bytes(bad.read_bytes()[:1500])  # truncated

    job_id = api_and_worker.post("/jobs", json=_coco_job("train", "val")).json()["id"]
    assert api_and_worker.get(f"/jobs/{job_id}").json()["lineage"] is None  # not run yet
    assert execute_job(job_id, "w@h") == "failed"
    job = api_and_worker.get(f"/jobs/{job_id}").json()
    assert f"image 250 ({bad})" in job["error"] and "cannot be read" in job["error"], job["error"]
    # what the failed run ran on was stored as it started (docs/usage.md#lineage)
    failed_lineage = job["lineage"]
    assert failed_lineage["code"]["version"] and failed_lineage["packages"]["torch"]
    assert failed_lineage["data"]["train"] != failed_lineage["data"]["val"]  # the val copy has a truncated image
    assert failed_lineage["teacher_sha256"] is None
    assert "Traceback" not in job["error"] and "DataLoader worker" not in job["error"]
    names = [c["name"] for c in api_and_worker.get(f"/jobs/{job_id}/checkpoints").json()]
    assert "final.pt" in names  # written before the evaluation that failed

    shutil.copy(MINI / "images" / bad.name, bad)  # fix the file, retry: evaluation only, no step re-run
    assert api_and_worker.post(f"/jobs/{job_id}/retry").status_code == 200
    assert execute_job(job_id, "w@h") == "succeeded"
    job = api_and_worker.get(f"/jobs/{job_id}").json()
    assert job["attempt"] == 2
    # attempt 2's lineage replaced attempt 1's: the fixed image gives val the same content as train
    assert job["lineage"]["data"]["val"] == job["lineage"]["data"]["train"] == failed_lineage["data"]["train"]
    engine = make_engine(get_settings().database_url)
    with engine.connect() as conn:  # every training point is attempt 1's: attempt 2 only evaluated
        rows = conn.execute(select(Metric.step, Metric.attempt).where(Metric.job_id == job_id)).all()
    engine.dispose()
    assert {step for step, _ in rows} >= {2} and {attempt for _, attempt in rows} == {1}


def test_a_corrupt_annotation_file_fails_the_job_naming_it(api_and_worker: TestClient, tmp_path: Path) -> None:
    from worker.run_job import execute_job

    data = tmp_path / "data"
    shutil.copytree(MINI, data / "train")
    (data / "train" / "instances.json").write_text('{"images": [\x01]}')
    job_id = api_and_worker.post("/jobs", json=_coco_job("train", "train")).json()["id"]
    assert execute_job(job_id, "w@h") == "failed"
    error = api_and_worker.get(f"/jobs/{job_id}").json()["error"]
    assert f"{data / 'train' / 'instances.json'} is not a valid COCO annotation file" in error, error
