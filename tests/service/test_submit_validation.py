"""Submit-time validation: path roots that hold, caps, bounded integers, NUL bytes, body size, and
`job:<id>` references checked against the spec's architecture. Every refusal is a 4xx naming the field."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.docs import DISTILL_EXAMPLE, TRAIN_EXAMPLE
from api.main import create_app
from icd_core.data_roots import resolve_in_roots
from store.artifacts import ArtifactStore
from store.db import make_engine, session_factory
from store.jobs import claim_job, finish_job
from store.results import add_checkpoint
from store.settings import Settings


def _spec() -> dict[str, Any]:
    return copy.deepcopy(TRAIN_EXAMPLE)


def _coco(images: str, annotations: str) -> dict[str, Any]:
    spec = _spec()
    spec["data"]["train"] = {"format": "coco", "images": images, "annotations": annotations}
    return spec


def _only(resp: Any, field: str) -> str:
    assert resp.status_code == 422, resp.text
    detail = resp.json()["detail"]
    assert isinstance(detail, list) and [e["field"] for e in detail] == [field], detail
    return detail[0]["msg"]


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """A COCO-shaped dataset inside the data root, and a secret file outside it."""
    root = tmp_path / "data"
    (root / "coco" / "images").mkdir(parents=True)
    (root / "coco" / "train.json").write_text("{}")
    (tmp_path / "secret.json").write_text("{}")
    (root / "escape").symlink_to(tmp_path / "secret.json")
    return root


@pytest.mark.parametrize(
    "annotations",
    [
        "../secret.json",  # `..` out of the root
        "coco/../../secret.json",
        "/etc/passwd",  # absolute, outside
        "escape",  # a symlink inside the root pointing out of it
        "%2e%2e/secret.json",  # URL-encoded ..
        "%252e%252e%252fsecret.json",  # double-encoded
        "/proc/self/environ",
    ],
)
def test_path_escapes_are_422_naming_the_field_and_roots(client: TestClient, dataset: Path, annotations: str) -> None:
    msg = _only(client.post("/jobs", json=_coco("coco/images", annotations)), "data.train.annotations")
    assert "outside the allowed roots" in msg and str(dataset) in msg


def test_paths_inside_the_roots_resolve_to_real_paths(client: TestClient, dataset: Path) -> None:
    r = client.post("/jobs", json=_coco("coco/images", "coco/./%74rain.json"))
    assert r.status_code == 201, r.text
    assert r.json()["spec"]["data"]["train"]["annotations"] == str(dataset / "coco" / "train.json")
    msg = _only(client.post("/jobs", json=_coco("coco/images", "nowhere.json")), "data.train.annotations")
    assert "in none of the roots; tried" in msg and str(dataset / "nowhere.json") in msg


def test_checkpoints_may_also_come_from_a_jobs_artifact_folder(client: TestClient, settings: Settings) -> None:
    jid = client.post("/jobs", json=_spec()).json()["id"]
    art = Path(settings.artifact_root) / "jobs" / str(jid) / "checkpoints" / "final.pt"  # type: ignore[arg-type]
    art.parent.mkdir(parents=True)
    art.write_bytes(b"x")
    spec = _spec()
    spec["model"]["checkpoint"] = str(art)
    assert client.post("/jobs", json=spec).status_code == 201
    for elsewhere in ("/etc/hostname", str(Path(settings.artifact_root) / "jobs" / "999" / "final.pt")):
        spec["model"]["checkpoint"] = elsewhere
        msg = _only(client.post("/jobs", json=spec), "model.checkpoint")
        assert "outside the allowed roots" in msg and str(settings.artifact_root) not in msg.split("roots:")[1]


def test_unset_roots_allow_the_working_folder_and_the_cache(settings: Settings, tmp_path: Path) -> None:
    s = settings.model_copy(update={"data_roots": []})
    assert s.allowed_data_roots() == [Path.cwd(), s.cache_dir]
    assert str(resolve_in_roots(str(Path.cwd()), s.allowed_data_roots())) == str(Path.cwd())
    with pytest.raises(ValueError, match="outside the allowed roots"):
        resolve_in_roots(str(tmp_path), s.allowed_data_roots())


@pytest.mark.parametrize(
    ("path", "value", "field", "says"),
    [
        (("schedule", "iterations"), 0, "schedule.iterations", ">= 1"),
        (("schedule", "iterations"), -5, "schedule.iterations", ">= 1"),
        (("model", "levels"), [], "model.levels", "at least one level"),
        (("schedule", "batch_size"), 1024, "schedule.batch_size", "ICD_MAX_BATCH_SIZE"),
        (("data", "max_size"), 4096, "data.max_size", "ICD_MAX_IMAGE_SIZE"),
        (("data", "train", "image_size"), 4096, "data.train.image_size", "ICD_MAX_IMAGE_SIZE"),
        (("data", "train", "num_images"), 1_000_000, "data.train.num_images", "ICD_MAX_DATASET_IMAGES"),
        (("schedule", "iterations"), 2**31 - 1, "schedule.iterations", "ICD_MAX_ITERATIONS"),
        (("schedule", "iterations"), 2**40, "schedule.iterations", "<= 2147483647"),
        (("schedule", "checkpoint_every"), 2**63, "schedule.checkpoint_every", "less than or equal to 2147483647"),
        (("schedule", "warmup_iters"), 2**63, "schedule.warmup_iters", "less than or equal to 2147483647"),
        (("data", "max_size"), 0, "data.max_size", "greater than or equal to 32"),
        (("data", "max_size"), -3, "data.max_size", "greater than or equal to 32"),
        (("model", "anchor_sizes"), [0, 32, 64], "model.anchor_sizes.0", "greater than 0"),
        (("model", "anchor_sizes"), [16, -32, 64], "model.anchor_sizes.1", "greater than 0"),
        (("data", "train", "min_object"), 100, "data.train.min_object", "above max_object"),
        (("data", "train", "max_object"), 500, "data.train.max_object", "does not fit in image_size"),
        (("device",), "cuda:-1", "device", "cuda:N with N in 0..63"),
        (("device",), "cuda:abc", "device", "cuda:N with N in 0..63"),
        (("device",), "cuda:٣", "device", "cuda:N with N in 0..63"),
        (("name",), "bad\x00name", "name", "NUL"),
        (("seed",), 2**64, "seed", "less than or equal to 9223372036854775807"),
    ],
)
def test_bad_values_are_refused_at_submit(
    client: TestClient, path: tuple[str, ...], value: Any, field: str, says: str
) -> None:
    spec = _spec()
    target = spec
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    r = client.post("/jobs", json=spec)
    assert says in _only(r, field)
    assert client.get("/jobs").json()["total"] == 0


@pytest.mark.parametrize("value", ["Infinity", "-Infinity", "NaN", "1e999"])
@pytest.mark.parametrize(
    ("path", "field"),
    [
        (("schedule", "lr"), "schedule.lr"),
        (("schedule", "weight_decay"), "schedule.weight_decay"),
        (("schedule", "grad_clip"), "schedule.grad_clip"),
        (("model", "anchor_sizes", 0), "model.anchor_sizes.0"),
    ],
)
def test_non_finite_floats_are_422_naming_the_field(
    client: TestClient, path: tuple[Any, ...], field: str, value: str
) -> None:
    """Python's JSON reader takes Infinity and NaN; PostgreSQL's JSON cannot store them (it was a 500)."""
    spec = _spec()
    target: Any = spec
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = "__HERE__"
    body = json.dumps(spec).replace('"__HERE__"', value)
    r = client.post("/jobs", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert field in [e["field"] for e in r.json()["detail"]], r.json()
    assert client.get("/jobs").json()["total"] == 0


@pytest.mark.parametrize(
    "url",
    [
        "/jobs/2147483648",
        "/jobs/0",
        "/jobs?offset=9999999999999999999",
        "/jobs/1/metrics?since_step=99999999999",
        "/jobs?parent_id=2147483648",
        "/jobs?name=a%00b",
        "/jobs/1/checkpoints/a%00b",
        "/jobs?status=bogus",
    ],
)
def test_out_of_range_and_nul_parameters_are_422_arrays(client: TestClient, url: str) -> None:
    r = client.get(url)
    assert r.status_code == 422, (url, r.text)
    assert isinstance(r.json()["detail"], list) and r.json()["detail"][0]["msg"]


def test_large_bodies_get_413_before_they_are_parsed(settings: Settings) -> None:
    app = create_app(settings.model_copy(update={"max_body_bytes": 10_000}))
    try:
        with TestClient(app) as c:
            big = b'{"name": "' + b"x" * 50_000_000 + b'"}'
            r = c.post("/jobs", content=big, headers={"content-type": "application/json"})
            assert r.status_code == 413 and "ICD_MAX_BODY_BYTES" in r.json()["detail"]

            def chunks() -> Any:  # no Content-Length: counted while it streams
                for _ in range(100):
                    yield b" " * 1000

            r = c.post("/jobs", content=chunks(), headers={"content-type": "application/json"})
            assert r.status_code == 413, r.text
            assert c.get("/jobs").json()["total"] == 0
    finally:
        app.state.engine.dispose()


def test_job_teachers_are_checked_against_the_spec_architecture(client: TestClient, settings: Settings) -> None:
    teacher = client.post("/jobs", json=_spec()).json()["id"]  # a 64-wide resnet34 neck
    engine = make_engine(settings.database_url)
    with session_factory(engine)() as s:
        claim_job(s, teacher, "w")
        store = ArtifactStore(settings.artifact_root)  # type: ignore[arg-type]
        f = store.job_dir(teacher) / "checkpoints" / "final.pt"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"x")
        add_checkpoint(s, teacher, 1, 1, "final.pt", store.relative(f), 1, store.sha256_file(f), True)
        finish_job(s, teacher, {})
    engine.dispose()
    distill = copy.deepcopy(DISTILL_EXAMPLE)
    distill["teacher"]["checkpoint"] = f"job:{teacher}"
    assert client.post("/jobs", json=distill).status_code == 201
    for side in ("teacher", "student"):
        distill[side]["fpn_channels"] = 128
    msg = _only(client.post("/jobs", json=distill), "teacher.checkpoint")
    assert "fpn_channels: spec 128 vs checkpoint 64" in msg and f"job {teacher}" in msg


def test_icd_train_honours_data_roots(tmp_path: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml
    from click.testing import CliRunner

    from icd_cli.main import main as cli

    spec = _coco("coco/images", "../secret.json")
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.setenv("ICD_DATA_ROOTS", f"{tmp_path / 'elsewhere'}{os.pathsep}{dataset}")
    r = CliRunner().invoke(cli, ["train", str(tmp_path / "spec.yaml"), "--output", str(tmp_path / "out")])
    assert r.exit_code != 0 and "data.train.annotations" in r.output and "outside the allowed roots" in r.output
    spec["data"]["train"]["annotations"] = "missing.json"
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    r = CliRunner().invoke(cli, ["train", str(tmp_path / "spec.yaml"), "--output", str(tmp_path / "out")])
    assert "in none of the roots; tried" in r.output
    assert str(tmp_path / "elsewhere" / "missing.json") in r.output and str(dataset / "missing.json") in r.output


def test_a_torchvision_teacher_file_is_422_with_the_import_command(client: TestClient, tmp_path: Path) -> None:
    """The model zoo's format (a bare state dict) passed validation before and failed on the worker after the
    data had loaded; now the submit names the field and the command that converts it."""
    import torch
    import torchvision

    model = torchvision.models.detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    path = tmp_path / "data" / "retinanet_resnet50_fpn_coco.pth"
    torch.save(model.state_dict(), path)
    spec = copy.deepcopy(DISTILL_EXAMPLE)
    spec["teacher"]["checkpoint"] = "retinanet_resnet50_fpn_coco.pth"  # relative: found in the data root
    msg = _only(client.post("/jobs", json=spec), "teacher.checkpoint")
    assert msg == (
        f"{path} is a torchvision state dict, not a checkpoint of this service; convert it with: "
        f"icd import-teacher {path} --from torchvision --arch retinanet_resnet50_fpn -o teacher.pt"
    )
    assert client.get("/jobs").json()["total"] == 0


def test_a_teacher_checkpoint_of_another_architecture_names_the_field(client: TestClient, tmp_path: Path) -> None:
    import torch

    from icd_core.detectors import build_detector, detector_meta
    from icd_core.spec import ModelSpec

    spec = copy.deepcopy(DISTILL_EXAMPLE)
    det = build_detector(ModelSpec.model_validate({**spec["teacher"], "checkpoint": None}), 6, 128, 128)
    path = tmp_path / "data" / "teacher.pt"
    torch.save({"model": det.state_dict(), **detector_meta(det, [str(i) for i in range(6)], list(range(6)))}, path)
    spec["teacher"]["checkpoint"] = str(path)
    assert client.post("/jobs", json=spec).status_code == 201
    spec["teacher"]["backbone"] = "resnet18"
    msg = _only(client.post("/jobs", json=spec), "teacher.backbone")
    assert msg.startswith(f"spec resnet18, checkpoint resnet34 (teacher.checkpoint {path})")
