"""The submit-time checkpoint gate (icd_core.checkpoint_gate, icd_core.checkpoint_format): a detector file
of another project is named with the command that imports it; a checkpoint of this service trained as
another architecture names the differing field; a `.pkl` is never unpickled."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
import torchvision
from trainer_specs import TINY_MODEL, distill_spec, train_spec

from icd_core.checkpoint_format import RESNET_LAYOUTS, identify, read_verdict
from icd_core.checkpoint_gate import checkpoint_problems
from icd_core.detectors import build_detector, detector_meta, read_checkpoint
from icd_core.spec import ModelSpec, parse_spec


def _torchvision_file(folder: Path, arch: str) -> Path:
    """A random-init torchvision detector's state dict, saved as the model zoo's files are."""
    builder = getattr(torchvision.models.detection, arch)
    model = builder(weights=None, weights_backbone=None, num_classes=91)
    path = folder / f"{arch}_coco.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.mark.parametrize(
    "arch", ["retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2", "fcos_resnet50_fpn", "fasterrcnn_resnet50_fpn"]
)
def test_a_torchvision_state_dict_is_refused_with_its_import_command(tmp_path: Path, arch: str) -> None:
    path = _torchvision_file(tmp_path, arch)
    expected = (
        "teacher.checkpoint",
        f"{path} is a torchvision state dict, not a checkpoint of this service; convert it with: "
        f"icd import-teacher {path} --from torchvision --arch {arch} -o teacher.pt",
    )
    assert checkpoint_problems(parse_spec(distill_spec(str(path)))) == [expected]
    with pytest.raises(ValueError) as info:  # the worker's reader says the same, for a run that skipped validate
        read_checkpoint(path)
    assert str(info.value) == expected[1]


def test_a_fine_tuning_checkpoint_is_checked_too_and_a_wrapped_state_dict_is_seen_through(tmp_path: Path) -> None:
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None)
    path = tmp_path / "fasterrcnn_mobilenet_v3_large_320_fpn-907ea3f9.pth"
    torch.save({"model": model.state_dict(), "optimizer": {}, "epoch": 26}, path)  # torchvision's references
    spec = train_spec()
    spec["model"]["checkpoint"] = str(path)
    [(field, msg)] = checkpoint_problems(parse_spec(spec))
    assert field == "model.checkpoint"
    assert "--from torchvision --arch fasterrcnn_mobilenet_v3_large_320_fpn -o teacher.pt" in msg


def _zeros(names: list[str]) -> dict[str, torch.Tensor]:
    return {name: torch.zeros(1) for name in names}


def _resnet(prefixes: list[str], depth: int) -> list[str]:
    """Key names of a bottleneck ResNet trunk of `depth` whose stages are named by `prefixes`."""
    blocks = next(b for (b, bottleneck), d in RESNET_LAYOUTS.items() if d == depth and bottleneck)
    return [
        f"{p}{i}.conv{c}.weight" for p, n in zip(prefixes, blocks, strict=True) for i in range(n) for c in (1, 2, 3)
    ]


def test_detectron2_and_mmdetection_layouts_are_told_apart_with_their_arch(tmp_path: Path) -> None:
    d2 = _resnet([f"backbone.bottom_up.res{i}." for i in range(2, 6)], 101)
    d2 += ["backbone.bottom_up.stem.conv1.weight", "backbone.fpn_lateral3.weight", "head.cls_score.weight"]
    verdict = identify({"model": _zeros(d2), "__author__": "Detectron2 Model Zoo"}, "x.pth")
    assert verdict is not None and (verdict.source, verdict.arch) == ("detectron2", "retinanet_R_101_FPN")

    mm = _resnet([f"backbone.layer{i}." for i in range(1, 5)], 50)
    mm += ["backbone.conv1.weight", "neck.lateral_convs.0.conv.weight", "rpn_head.rpn_conv.weight"]
    mm += ["roi_head.bbox_head.fc_cls.weight"]
    path = tmp_path / "faster_rcnn_r50_fpn_1x_coco.pth"
    torch.save({"state_dict": _zeros(mm), "meta": {"mmdet_version": "2.25.0"}}, path)
    assert (
        read_verdict(path)[1]
        .message(path)
        .endswith(  # type: ignore[union-attr]
            f"icd import-teacher {path} --from mmdet --arch faster_rcnn_r50_fpn -o teacher.pt"
        )
    )

    unknown = identify({"fc.weight": torch.zeros(1)}, "x.pt")
    assert unknown is not None and "--from torchvision|detectron2|mmdet --arch NAME" in unknown.message("x.pt")
    assert "not a detector checkpoint written by this service" in unknown.message("x.pt")


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_a_pkl_is_judged_by_its_name_and_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "model_final_971ab9.pkl"
    path.write_bytes(pickle.dumps({"model": _RunsCode(marker)}))
    [(field, msg)] = checkpoint_problems(parse_spec(distill_spec(str(path))))
    assert field == "teacher.checkpoint"
    assert msg == (
        f"{path} is a detectron2 pickle, not a checkpoint of this service; convert it with: "
        f"icd import-teacher {path} --from detectron2 --arch NAME -o teacher.pt"
    )
    with pytest.raises(ValueError, match="a detectron2 pickle"):
        read_checkpoint(path)
    assert not marker.exists()


def _service_checkpoint(path: Path, **model: object) -> Path:
    det = build_detector(ModelSpec.model_validate({**TINY_MODEL, **model}), 6, 64, 64)
    torch.save({"model": det.state_dict(), **detector_meta(det, [f"c{i}" for i in range(6)], list(range(6)))}, path)
    return path


def test_a_checkpoint_of_another_architecture_names_the_field(tmp_path: Path) -> None:
    path = _service_checkpoint(tmp_path / "teacher.pt")
    assert checkpoint_problems(parse_spec(distill_spec(str(path)))) == []  # the spec describes it
    spec = distill_spec(str(path))
    spec["teacher"]["backbone"] = "resnet34"
    spec["student"]["checkpoint"] = str(path)  # fine-tuning weights of the student's architecture: fine
    problems = checkpoint_problems(parse_spec(spec))
    assert problems == [
        (
            "teacher.backbone",
            f"spec resnet34, checkpoint resnet18 (teacher.checkpoint {path}); make teacher.backbone match the "
            "checkpoint or name another checkpoint",
        )
    ]
    our_bare = tmp_path / "bare.pt"
    torch.save(torch.load(path, weights_only=True)["model"], our_bare)
    [(_, msg)] = checkpoint_problems(parse_spec(distill_spec(str(our_bare))))
    assert "a bare state dict of this service's detector" in msg and "checkpoints/final.pt" in msg


def test_files_torch_cannot_read_and_fields_already_refused_are_left_alone(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"weights")  # the worker's reader names it when the job starts
    assert checkpoint_problems(parse_spec(distill_spec(str(garbage)))) == []
    tv = _torchvision_file(tmp_path, "retinanet_resnet50_fpn")
    assert checkpoint_problems(parse_spec(distill_spec(str(tv))), skip={"teacher.checkpoint"}) == []
    assert checkpoint_problems(parse_spec(distill_spec("job:3"))) == []  # the API checks job references
