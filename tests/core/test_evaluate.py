"""COCO evaluation: perfect detections, hand-computed partial cases, empty input, and a model run."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch
from pycocotools.coco import COCO
from torch import nn

from icd_core.data.coco import CocoDataset, load_coco
from icd_core.engine.callbacks import EvalResult
from icd_core.evaluate import METRIC_NAMES, coco_evaluate, evaluate_model


def _gt(boxes_per_image: dict[int, list[tuple[list[float], int]]], cats=((1, "a"), (2, "b"), (3, "unused"))) -> COCO:
    """An in-memory COCO ground truth: {image_id: [(xywh, category_id), ...]} on 200 x 200 images."""
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 200, "height": 200} for i in boxes_per_image]
    anns = []
    for image_id, boxes in boxes_per_image.items():
        for box, cat in boxes:
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": cat,
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )
    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns, "categories": [{"id": c, "name": n} for c, n in cats]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


LABEL_TO_CAT = [1, 2, 3]


def _det(image_id: int, boxes_xyxy: list[list[float]], labels: list[int], scores: list[float] | None = None) -> dict:
    return {
        "image_id": image_id,
        "boxes": torch.tensor(boxes_xyxy, dtype=torch.float32).reshape(-1, 4),
        "scores": torch.tensor(scores or [0.9] * len(labels)),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }


def test_ground_truth_scores_100_on_coco_mini(coco_mini, capsys):
    gt = load_coco(coco_mini[1])
    cat_ids = sorted(gt.getCatIds())
    dets = []
    for img_id in gt.getImgIds():
        anns = [a for a in gt.imgToAnns[img_id] if not a["iscrowd"]]
        dets.append(
            {
                "image_id": img_id,
                "boxes": [
                    [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns
                ],
                "scores": [1.0] * len(anns),
                "labels": [cat_ids.index(a["category_id"]) for a in anns],
            }
        )
    result = coco_evaluate(gt, dets, cat_ids)
    assert capsys.readouterr().out == ""  # pycocotools' prints are captured
    assert isinstance(result, EvalResult) and set(result.metrics) == set(METRIC_NAMES)
    for name in ("AP", "AP50", "AP75"):
        assert result.metrics[name] == pytest.approx(100.0)
    assert "toothbrush" not in result.per_class  # no ground truth: left out
    assert len(result.per_class) == len(cat_ids) - 1
    assert all(v == pytest.approx(100.0) for v in result.per_class.values())


def test_one_of_two_found_and_a_perfect_class():
    # Class a: two GT boxes, one detected exactly, one missed -> recall 0.5 with precision 1, so at every
    # IoU threshold 51 of the 101 recall points (0.00 .. 0.50) have precision 1: AP = 51/101.
    # Class b: one GT box detected exactly -> AP 1. Class "unused": no GT, left out of the mean.
    gt = _gt({1: [([10, 10, 50, 50], 1), ([100, 100, 60, 40], 1)], 2: [([20, 30, 40, 40], 2)]})
    dets = [_det(1, [[10, 10, 60, 60]], [0]), _det(2, [[20, 30, 60, 70]], [1])]
    r = coco_evaluate(gt, dets, LABEL_TO_CAT)
    ap_a = 100.0 * 51 / 101
    assert r.per_class == pytest.approx({"a": ap_a, "b": 100.0})
    for name in ("AP", "AP50", "AP75"):
        assert r.metrics[name] == pytest.approx((ap_a + 100.0) / 2)


def test_shifted_box_between_iou_thresholds():
    # GT 100x100, detection 100x72 sharing the top edge: IoU = 7200 / 10000 = 0.72. It is a true positive
    # at IoU thresholds .50 .55 .60 .65 .70 and a false positive at .75 .. .95: AP = 5/10 of 100.
    # Its area (10000 > 96^2) is "large"; small and medium have no ground truth and report 0.
    gt = _gt({1: [([0, 0, 100, 100], 1)]})
    r = coco_evaluate(gt, [_det(1, [[0, 0, 100, 72]], [0])], LABEL_TO_CAT)
    assert r.metrics["AP"] == pytest.approx(50.0)
    assert r.metrics["AP50"] == pytest.approx(100.0)
    assert r.metrics["AP75"] == pytest.approx(0.0)
    assert r.metrics["APl"] == pytest.approx(50.0)
    assert r.metrics["APs"] == 0.0 and r.metrics["APm"] == 0.0
    assert r.per_class == pytest.approx({"a": 50.0})


def test_score_order_matters():
    # A false positive (wrong place) ranked above the true positive: precision at recall 1 is 1/2.
    gt = _gt({1: [([0, 0, 100, 100], 1)]})
    dets = [_det(1, [[150, 150, 190, 190], [0, 0, 100, 100]], [0, 0], scores=[0.9, 0.5])]
    assert coco_evaluate(gt, dets, LABEL_TO_CAT).metrics["AP"] == pytest.approx(50.0)
    dets = [_det(1, [[150, 150, 190, 190], [0, 0, 100, 100]], [0, 0], scores=[0.5, 0.9])]
    assert coco_evaluate(gt, dets, LABEL_TO_CAT).metrics["AP"] == pytest.approx(100.0)


def test_zero_detections(capsys):
    gt = _gt({1: [([0, 0, 100, 100], 1)], 2: [([20, 30, 40, 40], 2)]})
    for dets in ([], [_det(1, [], []), _det(2, [], [])]):
        r = coco_evaluate(gt, dets, LABEL_TO_CAT)
        assert r.metrics == {name: 0.0 for name in METRIC_NAMES}
        assert r.per_class == {"a": 0.0, "b": 0.0}
    assert capsys.readouterr().out == ""


def test_image_ids_restrict_the_evaluation():
    gt = _gt({1: [([0, 0, 100, 100], 1)], 2: [([20, 30, 40, 40], 2)]})
    dets = [_det(1, [[0, 0, 100, 100]], [0])]
    assert coco_evaluate(gt, dets, LABEL_TO_CAT).metrics["AP"] == pytest.approx(50.0)  # b missed
    assert coco_evaluate(gt, dets, LABEL_TO_CAT, image_ids=[1]).metrics["AP"] == pytest.approx(100.0)


class GroundTruthDetector(nn.Module):
    """Stand-in detector: predicts each image's ground truth, looked up by the image's content."""

    def __init__(self, dataset: CocoDataset):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))  # something for .eval()/.train() to act on
        self.truth = {}
        for i in range(len(dataset)):
            image, target = dataset.load(i)
            self.truth[self._key(image)] = target

    @staticmethod
    def _key(image: torch.Tensor) -> tuple:
        return (tuple(image.shape), round(float(image.sum()), 2))

    def predict(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        assert not self.training and not torch.is_grad_enabled()
        out = []
        for image in images:
            t = self.truth[self._key(image)]
            out.append(
                {"boxes": t["boxes"] * self.scale, "scores": torch.ones(len(t["labels"])), "labels": t["labels"]}
            )
        return out


def test_evaluate_model_with_ground_truth_predictions(shapes_tiny):
    # A train-mode dataset with hflip 1: evaluate_model must still load images unflipped.
    ds = CocoDataset(*shapes_tiny, train=True, hflip=1.0)
    model = GroundTruthDetector(ds)
    model.train()
    seen = []
    r = evaluate_model(model, ds, batch_size=5, device="cpu", progress=lambda done, total: seen.append((done, total)))
    assert model.training  # mode restored
    assert r.step == 0 and r.metrics["AP"] == pytest.approx(100.0)
    assert set(r.per_class) <= set(ds.class_names) and all(v == pytest.approx(100.0) for v in r.per_class.values())
    assert seen[-1] == (len(ds), len(ds))
