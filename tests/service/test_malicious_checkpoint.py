"""A pickle that would run code, named as a teacher or a model checkpoint, through the real API and the
worker's task (in-process, real SQLite database and embedded broker): the job fails, nothing runs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from store.db import upgrade_database
from store.settings import get_settings

MODEL = {"detector": "retinanet", "backbone": "resnet18", "fpn_channels": 32, "levels": ["p3", "p4", "p5"]}
DATA = {"train": {"format": "shapes", "num_images": 4, "image_size": 64, "max_object": 32},
        "val": {"format": "shapes", "num_images": 2, "image_size": 64, "seed": 1, "max_object": 32},
        "min_size": 64, "max_size": 64, "workers": 0}


@pytest.fixture
def service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    """The API and the worker's task on one environment: ICD_* pointing at tmp_path."""
    from api.main import create_app
    from worker import db

    (tmp_path / "data").mkdir()
    monkeypatch.setenv("ICD_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ICD_DATABASE_URL", f"sqlite:///{tmp_path / 'icd.db'}")
    monkeypatch.setenv("ICD_BROKER_URL", f"sqla+sqlite:///{tmp_path / 'broker.db'}")
    monkeypatch.setenv("ICD_DATA_ROOTS", str(tmp_path / "data"))
    get_settings.cache_clear()
    db.dispose()
    upgrade_database(get_settings().database_url)
    app = create_app(get_settings())
    with TestClient(app) as c:
        yield c
    app.state.engine.dispose()
    db.dispose()
    get_settings.cache_clear()


@pytest.mark.parametrize("field", ["teacher", "model"])
def test_a_malicious_checkpoint_runs_nothing_through_api_and_worker(
    service: TestClient, tmp_path: Path, field: str, malicious_checkpoint: Any
) -> None:
    from worker.tasks import execute_job

    marker = tmp_path / "pwned"
    malicious_checkpoint(tmp_path / "data" / "evil.pt", marker)
    spec: dict[str, Any] = {"name": "evil", "device": "cpu", "data": DATA,
                            "schedule": {"iterations": 1, "batch_size": 2}}
    if field == "teacher":
        spec.update(kind="distill", teacher={**MODEL, "checkpoint": "evil.pt"}, student=MODEL)
    else:
        spec.update(kind="train", model={**MODEL, "checkpoint": "evil.pt"})
    r = service.post("/jobs", json=spec)
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]

    assert execute_job(job_id, "w@h") == "failed"
    job = service.get(f"/jobs/{job_id}").json()
    assert job["status"] == "failed"
    assert f"{tmp_path / 'data' / 'evil.pt'} is not a checkpoint written by this service" in job["error"]
    assert "(or by torch.save of a state dict)" in job["error"]
    assert not marker.exists()
