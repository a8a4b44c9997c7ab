"""The local CLI: `icd shapes make`, `icd train` (teacher, then an ICD student), `icd eval` of both."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from trainer_specs import TINY_MODEL, tiny_schedule

from icd_cli.main import main as cli
from icd_core.data.shapes import ANNOTATIONS, IMAGES

SHAPES_ARGS = [
    "--num-images",
    "16",
    "--image-size",
    "64",
    "--min-object",
    "6",
    "--max-object",
    "32",
    "--max-objects",
    "4",
]


def _invoke(args: list[str]) -> str:
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_module_entry_point_help() -> None:
    out = subprocess.run([sys.executable, "-m", "icd_cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("train", "eval", "shapes"):
        assert command in out.stdout


def test_shapes_make_and_user_errors(tmp_path: Path) -> None:
    out = _invoke(["shapes", "make", str(tmp_path / "s"), *SHAPES_ARGS, "--seed", "3"])
    assert "instances" in out
    coco = json.loads((tmp_path / "s" / ANNOTATIONS).read_text())
    assert len(coco["images"]) == 16
    bad = CliRunner().invoke(cli, ["shapes", "make", str(tmp_path / "t"), "--image-size", "64"])
    assert bad.exit_code != 0 and "max_object" in bad.output
    spec = tmp_path / "d.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "kind": "distill",
                "data": {"train": {"format": "shapes"}, "val": {"format": "shapes"}},
                "teacher": {**TINY_MODEL, "checkpoint": "job:3"},
                "student": TINY_MODEL,
                "device": "cpu",
            }
        )
    )
    res = CliRunner().invoke(
        cli, ["train", str(spec), "--output", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")]
    )
    assert res.exit_code != 0 and "job:<id> references need the service" in res.output
    res = CliRunner().invoke(cli, ["train", str(tmp_path / "missing.yaml")])
    assert res.exit_code != 0 and "not found" in res.output


@pytest.mark.slow
def test_end_to_end_teacher_then_icd_student(tmp_path: Path) -> None:
    train_dir, val_dir = tmp_path / "shapes-train", tmp_path / "shapes-val"
    _invoke(["shapes", "make", str(train_dir), *SHAPES_ARGS, "--seed", "1"])
    _invoke(["shapes", "make", str(val_dir), *SHAPES_ARGS, "--seed", "2"])

    def coco(folder: Path) -> dict:
        return {"format": "coco", "images": str(folder / IMAGES), "annotations": str(folder / ANNOTATIONS)}

    data = {"train": coco(train_dir), "val": coco(val_dir), "min_size": 64, "max_size": 64, "workers": 0}
    teacher_spec = tmp_path / "teacher.yaml"
    teacher_spec.write_text(
        yaml.safe_dump(
            {
                "kind": "train",
                "name": "teacher",
                "data": data,
                "model": TINY_MODEL,
                "device": "cpu",
                "schedule": tiny_schedule(4, eval_every=2, checkpoint_every=2),
            }
        )
    )
    out = _invoke(["train", str(teacher_spec), "--output", str(tmp_path / "teacher")])
    teacher_ckpt = tmp_path / "teacher" / "checkpoints" / "final.pt"
    assert teacher_ckpt.is_file() and "AP50" in out and "checkpoint" in out

    student_spec = tmp_path / "student.yaml"
    student_spec.write_text(
        yaml.safe_dump(
            {
                "kind": "distill",
                "name": "student",
                "data": data,
                "device": "cpu",
                "teacher": {**TINY_MODEL, "checkpoint": str(teacher_ckpt)},
                "student": TINY_MODEL,
                "distill": {"method": "icd", "icd": {"bypass_iters": 1}},
                "schedule": tiny_schedule(3, grad_clip=1.0),
            }
        )
    )
    out = _invoke(["train", str(student_spec), "--output", str(tmp_path / "student")])
    student_ckpt = tmp_path / "student" / "checkpoints" / "final.pt"
    assert student_ckpt.is_file() and "inherit_copied" in out
    summary = json.loads((tmp_path / "student" / "summary.json").read_text())
    assert summary["inherit"]["copied"] and summary["teacher_checkpoint"] == str(teacher_ckpt)

    # resuming a finished run re-evaluates it and leaves final.pt in place
    out = _invoke(["train", str(student_spec), "--output", str(tmp_path / "student"), "--resume"])
    assert "AP" in out

    out = _invoke(
        [
            "eval",
            str(teacher_ckpt),
            "--data-val-images",
            data["val"]["images"],
            "--data-val-annotations",
            data["val"]["annotations"],
            "--output",
            str(tmp_path / "ev1"),
        ]
    )
    assert "AP75" in out and "per-class AP" in out
    out = _invoke(["eval", str(student_ckpt), "--output", str(tmp_path / "ev2")])  # data from the run's spec
    assert "AP75" in out
    eval_spec = tmp_path / "eval.yaml"
    eval_spec.write_text(
        yaml.safe_dump(
            {
                "kind": "evaluate",
                "data": data,
                "device": "cpu",
                "model": {**TINY_MODEL, "checkpoint": str(student_ckpt)},
            }
        )
    )
    out = _invoke(["eval", str(eval_spec), "--output", str(tmp_path / "ev3")])
    summary = json.loads((tmp_path / "ev3" / "summary.json").read_text())
    assert summary["final_metrics"].keys() >= {"AP", "AP50"}
    assert list(summary["lineage"]["data"]) == ["val"]  # an evaluation reads data.val only


@pytest.fixture(scope="module")
def checkpoint_at_96(shapes_tiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny checkpoint whose run used min_size 96 / max_size 128 (not the DataSpec defaults)."""
    import torch

    from icd_core.data.coco import CocoDataset
    from icd_core.detectors import build_detector, detector_meta
    from icd_core.spec import ModelSpec

    ds = CocoDataset(*shapes_tiny, train=False)
    det = build_detector(ModelSpec.model_validate(TINY_MODEL), ds.num_classes, 96, 128)
    val = {"format": "coco", "images": str(shapes_tiny[0]), "annotations": str(shapes_tiny[1])}
    run = {"kind": "train", "data": {"train": val, "val": val, "min_size": [80, 96], "max_size": 128}}
    path = tmp_path_factory.mktemp("eval-sizes") / "final.pt"
    torch.save({**detector_meta(det, ds.class_names, ds.label_to_cat_id), "model": det.state_dict(), "spec": run}, path)
    return path


@pytest.mark.parametrize(
    ("flags", "sizes", "said"),
    [
        ([], (96, 128), "short side 96, long side at most 128 (from the checkpoint's run)"),
        (["--min-size", "64"], (64, 128), "short side 64, long side at most 128 (from --min-size/--max-size over"),
    ],
)
def test_eval_of_a_checkpoint_on_other_data_uses_the_runs_sizes(
    checkpoint_at_96: Path, shapes_tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flags, sizes, said
) -> None:
    """`icd eval CKPT --data-val-*` evaluated at the DataSpec defaults (320/512), not at the run's sizes."""
    import icd_core.runner as runner

    used = []
    real = runner.load_detector

    def recording(path, min_size, max_size):
        used.append((min_size, max_size))
        return real(path, min_size, max_size)

    monkeypatch.setattr(runner, "load_detector", recording)
    images, annotations = map(str, shapes_tiny)
    args = ["eval", str(checkpoint_at_96), "--data-val-images", images, "--data-val-annotations", annotations]
    out = _invoke([*args, *flags, "--device", "cpu", "-o", str(tmp_path / "ev"), "--cache-dir", str(tmp_path)])
    assert used == [sizes]
    assert said in out and "AP50" in out


@pytest.mark.parametrize(
    ("name", "text", "where"),
    [
        ("bad.yaml", "kind: train\nname: x\ndata:\n  train: {format: shapes\n  val: [1, 2\n", ":5:6: invalid YAML: "),
        ("tab.yml", "kind: train\n\tname: x\n", ":2:1: invalid YAML: found character"),
        ("bad.json", '{"kind": "train",}', ":1:18: invalid JSON: "),
    ],
)
@pytest.mark.parametrize("command", [["validate"], ["train"], ["study"], ["eval"]])
def test_a_spec_with_a_syntax_error_is_one_line_naming_file_line_and_column(
    tmp_path: Path, name: str, text: str, where: str, command: list[str]
) -> None:
    spec = tmp_path / name
    spec.write_text(text)
    res = CliRunner().invoke(cli, [*command, str(spec)])
    assert isinstance(res.exception, SystemExit) and res.exit_code == 1, res.exception  # not a traceback
    assert res.output.startswith(f"Error: {spec}{where}") and res.output.count("\n") == 1, res.output
