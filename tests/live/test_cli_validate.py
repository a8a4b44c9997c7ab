"""`icd validate SPEC`: checks a spec file locally (no server), errors as `field: reason`; and what `icd status`
makes of a job it was given."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from icd_cli.client import validate_cmd
from icd_cli.status_format import teacher_line as _teacher_line
from tests.helpers import tiny_distill_spec, tiny_study_spec, tiny_train_spec
from tests.live.conftest import write_spec


def test_validate_accepts_a_good_spec_and_names_bad_fields(tmp_path: Path) -> None:
    runner = CliRunner()
    good = runner.invoke(validate_cmd, [str(write_spec(tmp_path / "ok.yaml", tiny_train_spec("ok", 4)))])
    assert good.exit_code == 0 and "valid train spec 'ok'" in good.output

    spec = tiny_train_spec("bad", 4)
    spec["schedule"]["lr"] = 0
    spec["model"]["backbone"] = "resnet19"
    bad = runner.invoke(validate_cmd, [str(write_spec(tmp_path / "bad.yaml", spec))])
    assert bad.exit_code == 1
    assert "schedule.lr: Input should be greater than 0" in bad.output
    assert "model.backbone:" in bad.output

    study = tiny_study_spec()
    study["student"] = {**study["student"], "fpn_channels": 64}  # inherit needs matching necks
    mismatch = runner.invoke(validate_cmd, [str(write_spec(tmp_path / "study.yaml", study))])
    assert mismatch.exit_code == 1 and "student:" in mismatch.output and "fpn_channels" in mismatch.output


def test_validate_refuses_a_torchvision_teacher_with_the_import_command(tmp_path: Path) -> None:
    """What the API answers with 422 (icd_core.checkpoint_gate), checked locally without a server."""
    import torch
    import torchvision

    model = torchvision.models.detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    teacher = tmp_path / "retinanet_resnet50_fpn_coco.pth"
    torch.save(model.state_dict(), teacher)
    out = CliRunner().invoke(validate_cmd, [str(write_spec(tmp_path / "d.yaml", tiny_distill_spec(str(teacher))))])
    assert out.exit_code == 1, out.output
    assert (
        f"  teacher.checkpoint: {teacher} is a torchvision state dict, not a checkpoint of this service; convert it "
        f"with: icd import-teacher {teacher} --from torchvision --arch retinanet_resnet50_fpn -o teacher.pt"
    ) in out.output


def test_status_puts_a_distill_jobs_teacher_ap_beside_its_students() -> None:
    metrics = {"AP": 12.0, "AP50": 20.0, "teacher_AP": 30.5, "teacher_AP50": 51.25}
    assert _teacher_line(metrics) == "  teacher: AP 30.50  AP50 51.25  (student: AP 12.00)"
    assert _teacher_line({"AP": 12.0}) == ""  # a train job has no teacher
