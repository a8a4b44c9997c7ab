"""The reported AP must not depend on the evaluation batch size (issue 10 item 5, issue 23 item 15).

A batched forward differs from single-image forwards: padding to the largest image reaches the
other images' predictions, and even images of one size get other last bits from batch-dependent
conv kernels. Evaluation therefore runs the model on one image at a time (`predict_each_alone`);
the batch size only sets how many images a loader step decodes. The checks here are exact.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from icd_core.data.coco import CocoDataset
from icd_core.data.shapes import make_shapes
from icd_core.detectors import build_detector
from icd_core.evaluate import evaluate_model, loading_batches
from icd_core.spec import ModelSpec


def test_loading_batches_are_consecutive_and_respect_the_batch_size() -> None:
    assert loading_batches(5, 2) == [[0, 1], [2, 3], [4]]
    assert loading_batches(3, 4) == [[0, 1, 2]]
    assert loading_batches(2, 0) == [[0], [1]]
    assert loading_batches(0, 4) == []


class Recording(torch.nn.Module):
    """Wraps a detector and keeps every image's detections, and how many images each forward held."""

    def __init__(self, detector: torch.nn.Module):
        super().__init__()
        self.detector = detector
        self.outputs: list[dict[str, torch.Tensor]] = []
        self.forward_sizes: list[int] = []

    def predict(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        out = self.detector.predict(images)
        self.outputs.extend(out)
        self.forward_sizes.append(len(images))
        return out


@pytest.fixture(scope="module")
def confident_detector(coco_mini) -> torch.nn.Module:
    """A small random RetinaNet whose class prior is 0.5, so every image gets many detections."""
    torch.manual_seed(0)
    spec = ModelSpec(
        detector="retinanet", backbone="mobilenet_v2", fpn_channels=32, levels=["p3", "p4", "p5"], head_convs=1
    )
    det = build_detector(spec, CocoDataset(*coco_mini, train=False).num_classes, min_size=320, max_size=640)
    torch.nn.init.zeros_(det.model.head.classification_head.cls_logits.bias)
    return det.eval()


@pytest.fixture(scope="module")
def one_size(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(images_dir, annotations_json) of 8 generated 96 px shapes images: one size, so no padding."""
    out = tmp_path_factory.mktemp("one-size")
    return make_shapes(out, num_images=8, image_size=96, seed=0, num_classes=4, min_object=8, max_object=40)


@pytest.fixture(scope="module")
def one_size_detector(one_size) -> torch.nn.Module:
    """A random tiny Faster R-CNN: on equal-size images a batch of 4 used to give every image scores
    ~1e-7 off its batch-1 scores (batch-dependent conv kernels, no padding involved)."""
    torch.manual_seed(0)
    spec = ModelSpec(detector="faster_rcnn", backbone="resnet18", fpn_channels=32)
    return build_detector(spec, CocoDataset(*one_size, train=False).num_classes, min_size=96, max_size=128).eval()


def test_padding_in_a_batch_changes_predictions(coco_mini, confident_detector):
    ds = CocoDataset(*coco_mini, train=False)
    sizes = [ds.image_size(i) for i in range(len(ds))]
    # at short side 320, 4:3 images become 320×427 (padded 320×448), the 640×428 one 320×479 (320×480)
    small = min(range(len(ds)), key=lambda i: sizes[i][1] / sizes[i][0])
    large = max(range(len(ds)), key=lambda i: sizes[i][1] / sizes[i][0])
    img_small, img_large = ds.load(small)[0], ds.load(large)[0]
    alone = confident_detector.predict([img_small])[0]
    padded = confident_detector.predict([img_small, img_large])[0]
    assert alone["scores"].numel() > 0
    same = alone["boxes"].shape == padded["boxes"].shape and torch.allclose(alone["boxes"], padded["boxes"])
    assert not same  # the large neighbour's padding reached the small image's detections


@pytest.mark.parametrize("data", ["coco_mini", "one_size"])
def test_ap_and_detections_bit_identical_at_batch_1_and_4(request, data, confident_detector, one_size_detector):
    """Mixed sizes (coco_mini: padding) and one size (kernels): exact equality, no tolerance."""
    ds = CocoDataset(*request.getfixturevalue(data), train=False)
    detector = confident_detector if data == "coco_mini" else one_size_detector
    runs = {}
    for batch_size in (1, 4):
        rec = Recording(detector)
        result = evaluate_model(rec, ds, batch_size=batch_size)
        assert set(rec.forward_sizes) == {1}  # the model saw one image per forward
        runs[batch_size] = (result, rec.outputs)
    (one, one_outputs), (four, four_outputs) = runs[1], runs[4]
    assert sum(d["scores"].numel() for d in one_outputs) > 0
    assert four.metrics == one.metrics and four.per_class == one.per_class
    for a, b in zip(one_outputs, four_outputs, strict=True):
        assert torch.equal(a["boxes"], b["boxes"])
        assert torch.equal(a["scores"], b["scores"])
        assert torch.equal(a["labels"], b["labels"])
