"""A pickle that would run code, named as a teacher or a model checkpoint, through the real API and the
worker's task (in-process, real SQLite database and embedded broker): the job fails, nothing runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

MODEL = {"detector": "retinanet", "backbone": "resnet18", "fpn_channels": 32, "levels": ["p3", "p4", "p5"]}
DATA = {
    "train": {"format": "shapes", "num_images": 4, "image_size": 64, "max_object": 32},
    "val": {"format": "shapes", "num_images": 2, "image_size": 64, "seed": 1, "max_object": 32},
    "min_size": 64,
    "max_size": 64,
    "workers": 0,
}


@pytest.mark.parametrize("field", ["teacher", "model"])
def test_a_malicious_checkpoint_runs_nothing_through_api_and_worker(
    api_and_worker: TestClient, tmp_path: Path, field: str, malicious_checkpoint: Any
) -> None:
    from worker.run_job import execute_job

    marker = tmp_path / "pwned"
    malicious_checkpoint(tmp_path / "data" / "evil.pt", marker)
    spec: dict[str, Any] = {
        "name": "evil",
        "device": "cpu",
        "data": DATA,
        "schedule": {"iterations": 1, "batch_size": 2},
    }
    if field == "teacher":
        spec.update(kind="distill", teacher={**MODEL, "checkpoint": "evil.pt"}, student=MODEL)
    else:
        spec.update(kind="train", model={**MODEL, "checkpoint": "evil.pt"})
    r = api_and_worker.post("/jobs", json=spec)
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]

    assert execute_job(job_id, "w@h") == "failed"
    job = api_and_worker.get(f"/jobs/{job_id}").json()
    assert job["status"] == "failed"
    assert f"{tmp_path / 'data' / 'evil.pt'} is not a checkpoint written by this service" in job["error"]
    assert "(or by torch.save of a state dict)" in job["error"]
    assert not marker.exists()
