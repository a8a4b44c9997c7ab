"""The reported AP must not depend on the evaluation batch size (issue 10 item 5).

Padding a batch to its largest image changes the other images' predictions; evaluation therefore
batches only images of one size (`same_size_batches`), which makes batch 4 give batch 1's detections.
"""

from __future__ import annotations

import pytest
import torch

from icd_core.data.coco import CocoDataset
from icd_core.detectors import build_detector
from icd_core.evaluate import evaluate_model, same_size_batches
from icd_core.spec import ModelSpec


def test_same_size_batches_group_by_size_and_respect_the_batch_size() -> None:
    sizes = [(480, 640), (428, 640), (480, 640), (480, 640), (336, 448), (480, 640)]
    assert same_size_batches(sizes, 4) == [[0, 2, 3, 5], [1], [4]]
    assert same_size_batches(sizes, 2) == [[0, 2], [3, 5], [1], [4]]
    assert same_size_batches(sizes, 1) == [[0], [2], [3], [5], [1], [4]]
    assert same_size_batches([(96, 96)] * 5, 2) == [[0, 1], [2, 3], [4]]  # one size: batches as before


class Recording(torch.nn.Module):
    """Wraps a detector and keeps every image's detections, in the order predict returned them."""

    def __init__(self, detector: torch.nn.Module):
        super().__init__()
        self.detector = detector
        self.outputs: list[dict[str, torch.Tensor]] = []

    def predict(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        out = self.detector.predict(images)
        self.outputs.extend(out)
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


def _by_image(outputs: list[dict], image_ids: list[int]) -> dict[int, dict]:
    return dict(zip(image_ids, outputs, strict=True))


def test_padding_in_a_batch_changes_predictions_which_is_why_batches_hold_one_size(coco_mini, confident_detector):
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


def test_ap_and_detections_identical_at_batch_1_and_4(coco_mini, confident_detector):
    ds = CocoDataset(*coco_mini, train=False)
    assert len({ds.image_size(i) for i in range(len(ds))}) < len(ds)  # some sizes repeat: real batches form
    runs = {}
    for batch_size in (1, 4):
        rec = Recording(confident_detector)
        order = [i for b in same_size_batches([ds.image_size(i) for i in range(len(ds))], batch_size) for i in b]
        result = evaluate_model(rec, ds, batch_size=batch_size)
        runs[batch_size] = (result, _by_image(rec.outputs, [ds.image_ids[i] for i in order]))
    (r1, d1), (r4, d4) = runs[1], runs[4]
    assert r1.metrics == r4.metrics
    assert sum(d["scores"].numel() for d in d1.values()) > 0
    for image_id, one in d1.items():
        four = d4[image_id]
        assert one["boxes"].shape == four["boxes"].shape
        torch.testing.assert_close(four["boxes"], one["boxes"], atol=1e-4, rtol=0)
        torch.testing.assert_close(four["scores"], one["scores"], atol=1e-5, rtol=0)
        assert torch.equal(four["labels"], one["labels"])
