"""Export parity on real photos: TorchScript and ONNX exports of every detector against eager PyTorch.

Each detector is built at its DEFAULT levels (tiny: resnet18 trunk, 32 FPN channels, one head conv,
random init with spread classification biases and a low score threshold so every photo yields
detections), exported with `icd_core.export.write_export`, and run on every image of --images at each
--sizes setting. Per detector / format / size it prints the photos, the photos whose outputs differ
(different detection count, a detection without a same-label partner, or the verification's
`compare_detections` failing), the photos resized to another size than eager, and the largest
absolute score and box-corner difference between partnered detections. Those maxima cover every
detection, including the bottom of a list cut at `detections_per_img`, where near-equal scores may
keep a different last box on either side (the verification leaves that tail out).

`--stock-resize` exports with torchvision's own transform instead of `ExactResizeTransform`: the
behaviour before the fix, for comparison.

    PYTHONPATH=. .venv/bin/python benchmarks/export_parity.py --images DIR [--sizes 128x192 320x512]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch
from torch import Tensor

from icd_core import export
from icd_core.data.coco import decode_rgb
from icd_core.detectors import Detector, build_detector
from icd_core.export import ExportedDetector, Tolerance, compare_detections, detection_cap, export_meta, write_export
from icd_core.export_resize import eager_resized_size
from icd_core.spec import ModelSpec

DETECTORS = ("retinanet", "fcos", "faster_rcnn")
FORMATS = ("torchscript", "onnx")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


@dataclass
class Row:
    detector: str
    fmt: str
    size: str
    photos: int = 0
    differ: int = 0
    resized_differently: int = 0
    max_score_diff: float = 0.0
    max_box_diff: float = 0.0
    detections: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        return (
            f"{self.detector:<12} {self.fmt:<11} {self.size:>9} {self.photos:>6} {self.differ:>6} "
            f"{self.resized_differently:>8} {self.max_score_diff:>10.2e} {self.max_box_diff:>10.2e} "
            f"{self.detections / max(self.photos, 1):>7.1f} {self.seconds:>6.0f}"
        )


HEADER = (
    f"{'detector':<12} {'format':<11} {'size':>9} {'photos':>6} {'differ':>6} {'resize≠':>8} "
    f"{'max|Δscore|':>10} {'max|Δbox|px':>10} {'dets/img':>7} {'sec':>6}"
)


def tiny_detector(kind: str, min_size: int, max_size: int, score_thresh: float) -> Detector:
    """Default levels, random init; classification biases spread so scores cover 0..1 (not all ~0.01)."""
    torch.manual_seed(0)
    spec = ModelSpec.model_validate({"detector": kind, "backbone": "resnet18", "fpn_channels": 32, "head_convs": 1})
    det = build_detector(spec, 4, min_size, max_size).eval()
    if kind == "faster_rcnn":
        det.model.roi_heads.score_thresh = score_thresh
    else:
        torch.nn.init.normal_(det.model.head.classification_head.cls_logits.bias, -4.0, 1.0)
        det.model.score_thresh = score_thresh
    return det


def partner_diffs(a: dict[str, Tensor], b: dict[str, Tensor]) -> tuple[int, float, float]:
    """(detections of `a` without a same-label partner in `b`, max |score diff|, max corner diff) over partners.

    A detection's partner is the same-label detection of `b` nearest in max(corner offset, score
    difference): random heads emit duplicate boxes, which only the score tells apart.
    """
    if a["boxes"].numel() == 0:
        return 0, 0.0, 0.0
    if b["boxes"].numel() == 0:
        return int(a["boxes"].shape[0]), 0.0, 0.0
    corner = (a["boxes"][:, None, :].double() - b["boxes"][None, :, :].double()).abs().amax(-1)
    score = (a["scores"][:, None].double() - b["scores"][None, :].double()).abs()
    cost = torch.maximum(corner, score).masked_fill(a["labels"][:, None] != b["labels"][None, :], float("inf"))
    best, idx = cost.min(1)
    found = torch.isfinite(best)
    if not bool(found.any()):
        return int(a["boxes"].shape[0]), 0.0, 0.0
    rows = torch.arange(a["boxes"].shape[0])[found]
    cols = idx[found]
    return int((~found).sum()), float(score[rows, cols].max()), float(corner[rows, cols].max())


def compare_photo(det: Detector, exported: ExportedDetector, image: Tensor, row: Row, tol: Tolerance) -> None:
    with torch.inference_mode():
        eager = det.predict([image])[0]
    got = exported.predict([image])[0]
    lost, score_a, box_a = partner_diffs(eager, got)
    extra, score_b, box_b = partner_diffs(got, eager)
    problem = compare_detections(eager, got, tol, detection_cap(det))
    row.photos += 1
    row.detections += int(eager["scores"].numel())
    row.differ += int(bool(lost or extra or problem) or eager["scores"].numel() != got["scores"].numel())
    row.max_score_diff = max(row.max_score_diff, score_a, score_b)
    row.max_box_diff = max(row.max_box_diff, box_a, box_b)


def stock_sizes_differ(image: Tensor, min_size: int, max_size: int) -> bool:
    """Whether torchvision's float32 scripted scale resizes `image` to another size than eager."""
    h, w = image.shape[-2:]
    scale = torch.min(
        torch.tensor(float(min_size)) / torch.tensor(float(min(h, w))),
        torch.tensor(float(max_size)) / torch.tensor(float(max(h, w))),
    ).item()
    return [int(h * scale), int(w * scale)] != eager_resized_size(h, w, min_size, max_size)


def run_one(kind: str, fmt: str, size: tuple[int, int], photos: list[Tensor], args: argparse.Namespace) -> Row:
    min_size, max_size = size
    det = tiny_detector(kind, min_size, max_size, args.score_thresh)
    row = Row(kind, fmt, f"{min_size}/{max_size}")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"model.{'ts' if fmt == 'torchscript' else 'onnx'}"
        if args.stock_resize:
            with mock.patch.object(export, "with_exact_resize", lambda model: model):
                write_export(det, export_meta(det, {}, fmt), path)
        else:
            write_export(det, export_meta(det, {}, fmt), path)
        exported = ExportedDetector(path, threads=args.threads)
        for image in photos:
            compare_photo(det, exported, image, row, Tolerance())
            row.resized_differently += int(stock_sizes_differ(image, min_size, max_size))
    row.seconds = time.perf_counter() - start
    return row


def load_photos(folder: Path) -> list[Tensor]:
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SystemExit(f"no .jpg/.jpeg/.png images in {folder}")
    return [decode_rgb(f).float() / 255.0 for f in files]


def parse_size(text: str) -> tuple[int, int]:
    lo, hi = text.lower().split("x")
    return int(lo), int(hi)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=Path, required=True, help="folder of photos (every one is compared)")
    p.add_argument("--sizes", nargs="+", type=parse_size, default=[(128, 192), (320, 512)], help="MINxMAX")
    p.add_argument("--detectors", nargs="+", choices=DETECTORS, default=list(DETECTORS))
    p.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    p.add_argument("--score-thresh", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads")
    p.add_argument("--stock-resize", action="store_true", help="export with torchvision's transform (before the fix)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    photos = load_photos(args.images)
    shapes = {tuple(x.shape[-2:]) for x in photos}
    print(f"{len(photos)} photos, {len(shapes)} distinct sizes; torch {torch.__version__}; tolerance {Tolerance()}")
    print("resize≠: photos torchvision's scripted float32 scale resizes to another size than eager")
    print(HEADER, flush=True)
    for size in args.sizes:
        for kind in args.detectors:
            for fmt in args.formats:
                print(run_one(kind, fmt, size, photos, args).line(), flush=True)


if __name__ == "__main__":
    main()
