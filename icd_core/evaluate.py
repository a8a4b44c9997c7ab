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


def loading_batches(count: int, batch_size: int) -> list[list[int]]:
    """Consecutive index batches of at most `batch_size`: what one loader step decodes, not what the model sees."""
    step = max(1, int(batch_size))
    return [list(range(i, min(i + step, count))) for i in range(0, count, step)]


def predict_each_alone(detector: nn.Module, images: Sequence[torch.Tensor], device: torch.device | str) -> list[dict]:
    """`detector.predict` on one image at a time, so an image's detections never depend on its batch.

    Why not one call per batch: a batched forward differs from single-image forwards in two ways.
    (1) The detector pads a batch to its largest image, and the padding reaches real pixels through
    conv bias/ReLU, the FPN top-down path and P6/P7 (the same teacher scored AP 12.86 at batch 1 and
    11.65 at batch 4 on coco128). (2) Even for images of one size, the convolution and matrix-multiply
    kernels (oneDNN/MKL on the CPU, cuDNN/cuBLAS on the GPU) pick their blocking and summation order by
    the batch dimension: on the CPU a tiny ResNet-18 FPN's features at batch 4 differ from batch 1 by
    up to 1e-5 and a Faster R-CNN's scores by ~1e-7, enough to reorder near-ties and move boxes across
    the score threshold and the top-k cut (issue 23: AP 0.00063371 at batch 1, 0.00063855 at batch 4,
    with batches already of one size). One image per forward is the same computation at any batch
    size, so detections and AP are bit-identical; the cost is the GPU's batching speed-up.
    """
    outputs = []
    for image in images:
        outputs.extend(detector.predict([image.to(device, non_blocking=True)]))
    return outputs


def detection_record(target: dict, out: dict[str, torch.Tensor]) -> dict:
    """One image's detections on the CPU, keyed by its image id, for `coco_evaluate`."""
    return {
        "image_id": target["image_id"],
        "boxes": out["boxes"].float().cpu(),
        "scores": out["scores"].float().cpu(),
        "labels": out["labels"].cpu(),
    }


def evaluate_model(
    detector: nn.Module,
    dataset: CocoDataset,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    workers: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> EvalResult:
    """Run `detector.predict` over `dataset` and COCO-evaluate it (step left 0 for the caller).

    predict must return per image a dict with boxes (xyxy, original image pixels), scores and labels
    (contiguous). The detector's train/eval mode is restored afterwards. progress(done, total) is
    called after every batch. `batch_size` only sets how many images a loader step decodes: the
    model sees one image per forward (`predict_each_alone`), so the AP is the same at every batch size.
    """
    was_training = detector.training
    detector.eval()
    loader = make_batched_loader(_Unaugmented(dataset), loading_batches(len(dataset), batch_size), workers=workers)
    detections: list[dict] = []
    try:
        with torch.inference_mode():
            for images, targets in loader:
                outputs = predict_each_alone(detector, images, device)
                detections.extend(detection_record(t, o) for t, o in zip(targets, outputs, strict=True))
                if progress is not None:
                    progress(len(detections), len(dataset))
    finally:
        detector.train(was_training)
    return coco_evaluate(dataset.coco, detections, dataset.label_to_cat_id, image_ids=dataset.image_ids)
