"""COCO box mAP with pycocotools, for detections in original image pixels.

All numbers are percent (0..100). Where pycocotools reports -1 (no ground truth in an area range),
we report 0.0 so every value is a finite number that JSON and SQL can hold.
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Callable, Sequence

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn
from torch.utils.data import Dataset

from .data.coco import CocoDataset
from .data.loader import make_batched_loader
from .engine.callbacks import EvalResult

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # the first six of COCOeval.stats


def _as_numpy(x: object) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


def detections_to_coco(detections: Sequence[dict], label_to_cat_id: Sequence[int]) -> list[dict]:
    """Per-image {image_id, boxes xyxy, scores, labels (contiguous)} -> COCO result records (xywh, category_id)."""
    records = []
    for det in detections:
        boxes = _as_numpy(det["boxes"]).reshape(-1, 4).astype(np.float64)
        scores = _as_numpy(det["scores"]).reshape(-1).astype(np.float64)
        labels = _as_numpy(det["labels"]).reshape(-1).astype(np.int64)
        image_id = int(det["image_id"])
        for (x1, y1, x2, y2), s, lab in zip(boxes.tolist(), scores.tolist(), labels.tolist(), strict=True):
            records.append(
                {
                    "image_id": image_id,
                    "category_id": int(label_to_cat_id[lab]),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": s,
                }
            )
    return records


def _empty_results(coco_gt: COCO) -> COCO:
    """A results COCO with no detections (pycocotools' loadRes cannot take an empty list)."""
    res = COCO()
    res.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "categories": copy.deepcopy(coco_gt.dataset["categories"]),
        "annotations": [],
    }
    res.createIndex()
    return res


def coco_evaluate(
    coco_gt: COCO,
    detections: Sequence[dict],
    label_to_cat_id: Sequence[int],
    image_ids: Sequence[int] | None = None,
) -> EvalResult:
    """COCO box AP (percent) of `detections` against `coco_gt`; step is 0 (the caller fills it).

    detections: one dict per image with image_id, boxes (xyxy, original pixels), scores and labels
    (contiguous, mapped to COCO ids through `label_to_cat_id`). image_ids restricts the evaluation
    (default: every image of coco_gt; images without detections count as misses).
    per_class: AP over IoU .50:.95, all areas, 100 detections, for each category that has ground truth.
    """
    records = detections_to_coco(detections, label_to_cat_id)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(records) if records else _empty_results(coco_gt)
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        if image_ids is not None:
            ev.params.imgIds = sorted(int(i) for i in image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    metrics = {name: max(float(v), 0.0) * 100.0 for name, v in zip(METRIC_NAMES, ev.stats[:6], strict=True)}

    per_class = {}
    precision = ev.eval["precision"]  # [iou T, recall R, class K, area A, maxDets M]
    for k, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        if p.size:  # -1 everywhere: the class has no ground truth in the evaluated images
            per_class[coco_gt.cats[cat_id]["name"]] = float(p.mean()) * 100.0
    return EvalResult(step=0, metrics=metrics, per_class=per_class)


class _Unaugmented(Dataset):
    """A CocoDataset's items without flipping, whatever its train flag."""

    def __init__(self, dataset: CocoDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.dataset.load(index, flip=False)


def same_size_batches(sizes: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Evaluation batches of at most `batch_size` indices whose images all have the same (h, w).

    Why: the detector pads a batch to its largest image. The padded region is not empty to the
    network: every conv layer writes bias/ReLU/FPN-top-down values there, which then reach the real
    pixels near the border through the receptive field (and P6/P7 see it all), so an image's
    detections change with its batch neighbours (the same teacher scored AP 12.86 at batch 1 and 11.65
    at batch 4 on coco128). Images of one size get the same resized and padded tensor as they would
    alone, so batching them changes nothing (detectron2 evaluates at batch 1 for the same reason).
    Groups keep the dataset order of their first image; a dataset of one image size batches as before.
    """
    groups: dict[tuple[int, int], list[int]] = {}
    for index, size in enumerate(sizes):
        groups.setdefault((int(size[0]), int(size[1])), []).append(index)
    step = max(1, int(batch_size))
    return [members[i : i + step] for members in groups.values() for i in range(0, len(members), step)]


def evaluate_model(
    detector: nn.Module,
    dataset: CocoDataset,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    workers: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> EvalResult:
    """Run `detector.predict(images)` over `dataset` and COCO-evaluate it (step left 0 for the caller).

    predict must return per image a dict with boxes (xyxy, original image pixels), scores and labels
    (contiguous). The detector's train/eval mode is restored afterwards. progress(done, total) is
    called after every batch. Batches only hold images of one size (`same_size_batches`), so the AP
    does not depend on `batch_size`.
    """
    was_training = detector.training
    detector.eval()
    batches = same_size_batches([dataset.image_size(i) for i in range(len(dataset))], batch_size)
    loader = make_batched_loader(_Unaugmented(dataset), batches, workers=workers)
    detections: list[dict] = []
    try:
        with torch.inference_mode():
            for images, targets in loader:
                outputs = detector.predict([img.to(device, non_blocking=True) for img in images])
                for target, out in zip(targets, outputs, strict=True):
                    detections.append(
                        {
                            "image_id": target["image_id"],
                            "boxes": out["boxes"].float().cpu(),
                            "scores": out["scores"].float().cpu(),
                            "labels": out["labels"].cpu(),
                        }
                    )
                if progress is not None:
                    progress(len(detections), len(dataset))
    finally:
        detector.train(was_training)
    return coco_evaluate(dataset.coco, detections, dataset.label_to_cat_id, image_ids=dataset.image_ids)
