"""`icd predict`: COCO-format detections that pycocotools opens, and annotated PNGs that open."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from pycocotools.coco import COCO
from trainer_specs import train_spec

from icd_cli.main import main as cli
from icd_core.detectors import read_checkpoint
from icd_core.predict import LoadedModel, draw_detections, write_predictions
from icd_core.runner import run_spec
from icd_core.spec import parse_spec


@pytest.fixture(scope="module")
def hot_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny trained checkpoint whose classification bias is spread so it returns boxes to draw."""
    root = tmp_path_factory.mktemp("predict")
    spec = {**train_spec(1), "deploy": {"cost": False, "prediction_images": 0}}
    run = run_spec(parse_spec(spec), root / "run", cache_dir=root / "cache")
    saved = read_checkpoint(run.final_checkpoint)
    key = "model.head.classification_head.cls_logits.bias"
    saved["model"][key] = torch.randn(saved["model"][key].shape, generator=torch.Generator().manual_seed(0)) + 1.0
    path = root / "hot.pt"
    torch.save(saved, path)
    return path


def _check_outputs(out: Path, images: list[Path], class_names: list[str]) -> None:
    coco = COCO(str(out / "detections.json"))  # pycocotools opens it as a dataset ...
    assert [coco.imgs[i]["file_name"] for i in sorted(coco.imgs)] == [p.name for p in images]
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == class_names
    anns = coco.dataset["annotations"]
    assert anns and all(0.0 <= a["score"] <= 1.0 for a in anns)
    coco.loadRes(anns)  # ... and its annotations as a results list
    for p in images:
        with Image.open(out / f"{p.stem}.png") as im:
            im.load()
            with Image.open(p) as src:
                assert im.format == "PNG" and im.size == src.size


def test_icd_predict_with_a_checkpoint_and_with_an_export(hot_checkpoint: Path, coco_mini, tmp_path: Path) -> None:
    images = sorted(coco_mini[0].iterdir())[:2]
    names = read_checkpoint(hot_checkpoint)["class_names"]
    runner = CliRunner()
    res = runner.invoke(
        cli, ["predict", str(hot_checkpoint), *map(str, images), "--out", str(tmp_path / "ckpt"), "--score-min", "0.5"]
    )
    assert res.exit_code == 0, res.output
    assert "detections:" in res.output
    _check_outputs(tmp_path / "ckpt", images, names)

    res = runner.invoke(
        cli,
        [
            "export",
            str(hot_checkpoint),
            "--format",
            "onnx",
            "-o",
            str(tmp_path / "m.onnx"),
            "--verify-images",
            "2",
            "--eval-images",
            "2",
            "--cache-dir",
            str(hot_checkpoint.parent / "cache"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "verified: detections on 7 images match" in res.output  # 2 validation images + 5 aspect-ratio probes
    res = runner.invoke(cli, ["predict", str(tmp_path / "m.onnx"), *map(str, images), "-o", str(tmp_path / "onnx")])
    assert res.exit_code == 0, res.output
    _check_outputs(tmp_path / "onnx", images, names)
    by_ckpt = json.loads((tmp_path / "ckpt" / "detections.json").read_text())["annotations"]
    by_onnx = json.loads((tmp_path / "onnx" / "detections.json").read_text())["annotations"]
    assert len(by_ckpt) == len(by_onnx)


def test_icd_predict_names_a_missing_or_broken_input(hot_checkpoint: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(cli, ["predict", str(tmp_path / "nope.pt"), "x.jpg", "-o", str(tmp_path)])
    assert res.exit_code != 0 and "model not found" in res.output
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    res = runner.invoke(cli, ["predict", str(hot_checkpoint), str(bad), "-o", str(tmp_path / "o")])
    assert res.exit_code != 0 and "bad.jpg: not an image" in res.output


def test_draw_detections_draws_boxes_above_the_score() -> None:
    image = torch.zeros(3, 40, 60)
    det = {
        "boxes": torch.tensor([[5.0, 20.0, 30.0, 35.0], [35.0, 5.0, 55.0, 30.0]]),
        "scores": torch.tensor([0.9, 0.1]),
        "labels": torch.tensor([0, 1]),
    }
    canvas = draw_detections(image, det, ["cat", "dog"], score_min=0.5)
    pixels = torch.tensor(list(canvas.getdata())).reshape(40, 60, 3)
    assert pixels[35, 15].sum() > 0  # the kept box's bottom edge (y2 = 35)
    assert pixels[29, 45].sum() == 0  # the low-scoring box is not drawn


class _FixedModel:
    """Answers every image with one confident box of class 1 (enough to test what gets written)."""

    def predict(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        box = torch.tensor([[4.0, 4.0, 20.0, 20.0]])
        return [{"boxes": box, "scores": torch.tensor([0.8]), "labels": torch.tensor([1])} for _ in images]


def test_write_predictions_keeps_the_raw_image_for_viewers_that_draw_boxes(tmp_path: Path) -> None:
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    loaded = LoadedModel(_FixedModel(), ["cat", "dog"], [1, 2], "fixed")
    written = write_predictions(loaded, [(7, "img7.jpg", image)], tmp_path, raw=True)
    with Image.open(tmp_path / "raw" / "img7.png") as raw, Image.open(written.pngs[0]) as boxed:
        expected = (image * 255).round().byte().permute(1, 2, 0)
        assert torch.equal(torch.tensor(list(raw.getdata()), dtype=torch.uint8).reshape(32, 32, 3), expected)
        assert list(raw.getdata()) != list(boxed.getdata())  # the box is drawn on the PNG only
    coco = json.loads(written.path.read_text())
    assert coco["info"] == {"drawn_score_min": 0.3}  # what a viewer needs to draw the same boxes
    assert coco["annotations"][0]["category_id"] == 2 and coco["images"][0]["file_name"] == "img7.jpg"
    assert not (tmp_path / "other" / "raw").exists()
    write_predictions(loaded, [(7, "img7.jpg", image)], tmp_path / "other")  # `icd predict`: no raw/ folder
    assert not (tmp_path / "other" / "raw").exists()


@pytest.mark.parametrize(("suffix", "what"), [(".onnx", "an ONNX model"), (".ts", "a TorchScript file")])
def test_icd_predict_with_a_renamed_text_file_as_export_is_one_line(
    coco_mini, tmp_path: Path, suffix: str, what: str
) -> None:
    fake = tmp_path / f"model{suffix}"
    fake.write_text("not a model\n")
    image = sorted(coco_mini[0].iterdir())[0]
    res = CliRunner().invoke(cli, ["predict", str(fake), str(image), "-o", str(tmp_path / "out")])
    assert isinstance(res.exception, SystemExit) and res.exit_code == 1, res.exception  # not a traceback
    assert res.output.startswith(f"Error: {fake} is not {what} that can be read (") and res.output.count("\n") == 1


def test_icd_predict_says_when_no_box_reaches_score_min(hot_checkpoint: Path, coco_mini, tmp_path: Path) -> None:
    images = sorted(coco_mini[0].iterdir())[:2]
    res = CliRunner().invoke(cli, ["predict", str(hot_checkpoint), *map(str, images), "-o", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    drawn = int(res.output.split(" boxes drawn")[0].rsplit(" ", 1)[-1])
    assert drawn > 0 and "no box scored" not in res.output
    res = CliRunner().invoke(
        cli, ["predict", str(hot_checkpoint), *map(str, images), "-o", str(tmp_path / "e"), "--score-min", "1"]
    )
    assert res.exit_code == 0, res.output
    for image in images:
        assert f"{image.stem}.png: no box scored at least --score-min 1 (best score 0." in res.output
    assert "0 boxes drawn (score at least 1;" in res.output
    assert json.loads((tmp_path / "e" / "detections.json").read_text())["annotations"]  # the JSON keeps them all
