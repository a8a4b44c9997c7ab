"""Export a trained detector (the student only: no teacher, no distiller) to TorchScript or ONNX.

Both formats take one float32 RGB image [3, H, W] in 0..1 at any size and return (boxes xyxy in that
image's pixels, scores, labels 0-based); the resize and normalization stay inside the model, so a
deployment only decodes and divides by 255. Each file carries its metadata (classes and their dataset
category ids, normalization, sizes, the spec it came from, how it was verified): TorchScript as the
extra file `icd_meta.json`, ONNX as the `icd_meta` metadata property.

ONNX goes through torch's TorchScript-based exporter (`torch.onnx.export(..., dynamo=False)`): the
dynamo exporter needs onnxscript and cannot trace torchvision's data-dependent post-processing
(score thresholds, NMS) without graph breaks, while the legacy tracer is what torchvision's own ONNX
tests use for RetinaNet, FCOS and Faster R-CNN.
"""

from __future__ import annotations

import contextlib
import copy
import json
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .detectors import Detector
from .export_resize import probe_images, with_exact_resize
from .spec import EXPORT_SUFFIX

FORMATS = tuple(EXPORT_SUFFIX)
SUFFIX = EXPORT_SUFFIX
ONNX_OPSET = 17
MIN_ONNX_OPSET = 11  # torchvision's detection ops (RoIAlign, NMS, resize) need at least opset 11
META_KEY = "icd_meta"
TS_META_FILE = "icd_meta.json"
ONNX_EXPORTER = "torch.onnx.export(dynamo=False): the TorchScript-based exporter"


class ExportError(ValueError):
    """A model that cannot be exported in the requested format, or an export that failed verification."""


class SingleImageDetector(nn.Module):
    """One image in, (boxes, scores, labels) out: the interface both export formats share."""

    def __init__(self, model: nn.Module, label_offset: int):
        super().__init__()
        self.model = model
        self.label_offset = label_offset

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if torch.jit.is_scripting():  # scripted torchvision detectors return (losses, detections)
            _, detections = self.model([image])
        else:
            detections = self.model([image])
        d = detections[0]
        return d["boxes"], d["scores"], d["labels"] - self.label_offset


def export_meta(detector: Detector, checkpoint: dict[str, Any], fmt: str, source: str | None = None) -> dict[str, Any]:
    """The metadata an export carries: enough to decode its outputs without the checkpoint or the code."""
    transform = detector.model.transform
    return {
        "format": fmt,
        "detector": detector.spec.detector,
        "backbone": detector.spec.backbone,
        "num_classes": detector.num_classes,
        "class_names": list(checkpoint.get("class_names") or []),
        "label_to_cat_id": [int(c) for c in checkpoint.get("label_to_cat_id") or []],
        "image_mean": [float(v) for v in transform.image_mean],
        "image_std": [float(v) for v in transform.image_std],
        "min_size": int(max(transform.min_size)),
        "max_size": int(transform.max_size),
        "input": "image: float32 [3, H, W], RGB in 0..1, any H and W (resized and normalized inside)",
        "outputs": [
            "boxes: float32 [N, 4] xyxy in input pixels",
            "scores: float32 [N]",
            "labels: int64 [N], 0-based; category id = label_to_cat_id[label]",
        ],
        "model_spec": detector.spec.model_dump(mode="json"),
        "source_spec": checkpoint.get("spec"),
        "source_checkpoint": source,
        "step": int(checkpoint.get("step", 0)),
        "torch": torch.__version__,
        "opset": ONNX_OPSET if fmt == "onnx" else None,
        "exporter": ONNX_EXPORTER if fmt == "onnx" else "torch.jit.script",
    }


# --- writing ----------------------------------------------------------------------------------------
def _save_torchscript(wrapper: SingleImageDetector, path: Path, meta: dict[str, Any]) -> None:
    try:
        scripted = torch.jit.script(wrapper)
    except Exception as err:  # TorchScript's frontend raises bare RuntimeErrors with source excerpts
        raise ExportError(f"{meta['detector']} cannot be scripted for TorchScript: {_first_line(err)}") from err
    torch.jit.save(scripted, str(path), _extra_files={TS_META_FILE: json.dumps(meta)})


def _save_onnx(wrapper: SingleImageDetector, path: Path, meta: dict[str, Any], opset: int, example: Tensor) -> None:
    if opset < MIN_ONNX_OPSET:
        raise ExportError(
            f"opset {opset}: torchvision's detectors need ONNX opset >= {MIN_ONNX_OPSET} "
            "(RoIAlign, NonMaxSuppression, Resize with scales)"
        )
    import onnx

    try:
        with torch.inference_mode():
            wrapper(example)
    except Exception as err:  # not the exporter's fault: say so instead of blaming ONNX
        raise ExportError(
            f"{meta['detector']} fails in eager PyTorch on the {example.shape[1]}x{example.shape[2]} "
            f"example image the ONNX tracer needs: {_first_line(err)}"
        ) from err
    try:
        with warnings.catch_warnings():  # the tracer warns about every Python-side shape computation
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper,
                (example,),
                str(path),
                dynamo=False,
                opset_version=opset,
                do_constant_folding=True,
                input_names=["image"],
                output_names=["boxes", "scores", "labels"],
                dynamic_axes={
                    "image": {1: "height", 2: "width"},
                    "boxes": {0: "detections"},
                    "scores": {0: "detections"},
                    "labels": {0: "detections"},
                },
            )
    except Exception as err:
        raise ExportError(
            f"{meta['detector']} cannot be exported to ONNX opset {opset} with {ONNX_EXPORTER}: {_first_line(err)}"
        ) from err
    write_onnx_meta(path, meta)
    onnx.checker.check_model(str(path))


def write_onnx_meta(path: Path, meta: dict[str, Any]) -> None:
    import onnx

    model = onnx.load(str(path))
    for prop in [p for p in model.metadata_props if p.key == META_KEY]:
        model.metadata_props.remove(prop)
    model.metadata_props.add(key=META_KEY, value=json.dumps(meta))
    onnx.save(model, str(path))


def _first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def write_export(detector: Detector, meta: dict[str, Any], path: str | Path, opset: int = ONNX_OPSET) -> Path:
    """Write `detector` (eval mode, CPU) as meta['format'] to `path`, its metadata embedded."""
    fmt = meta["format"]
    if fmt not in FORMATS:
        raise ExportError(f"format: {fmt!r} is not one of {', '.join(FORMATS)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = with_exact_resize(detector.model.cpu().eval())
    wrapper = SingleImageDetector(model, detector.label_offset).eval()
    if fmt == "torchscript":
        _save_torchscript(wrapper, path, meta)
    else:
        side = int(meta["min_size"])
        example = torch.rand(3, side, side + side // 4, generator=torch.Generator().manual_seed(0))
        _save_onnx(wrapper, path, {**meta, "opset": opset}, opset, example)
    return path


# --- reading ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def _unreadable_export(path: Path, what: str) -> Iterator[None]:
    """A file that onnx/torch.jit cannot parse (truncated, renamed, not a model) as one ValueError naming it:
    the parsers raise protobuf DecodeError / RuntimeError with C++ stack text that says neither."""
    try:
        yield
    except Exception as err:
        reason = _first_line(err)
        reason = reason if len(reason) <= 120 else reason[:117] + "..."
        raise ValueError(f"{path} is not {what} that can be read ({reason}); give a file icd export wrote") from err


def _jit_load(path: Path, **kwargs: Any) -> torch.jit.ScriptModule:
    """torch.jit.load on the CPU without its deprecation FutureWarning: exports are TorchScript by choice
    (`icd export --format torchscript`), and the warning buried one-line CLI errors."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.*deprecated", category=FutureWarning)
        return torch.jit.load(str(path), map_location="cpu", **kwargs)


def read_export_meta(path: str | Path) -> dict[str, Any]:
    """The metadata embedded in an exported model (either format)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exported model not found: {path}")
    if path.suffix == ".onnx":
        import onnx

        with _unreadable_export(path, "an ONNX model"):
            props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        if META_KEY not in props:
            raise ValueError(f"{path} carries no {META_KEY} metadata: not exported by icd export")
        return json.loads(props[META_KEY])
    extra = {TS_META_FILE: ""}
    with _unreadable_export(path, "a TorchScript file"):
        _jit_load(path, _extra_files=extra)
    if not extra[TS_META_FILE]:
        raise ValueError(f"{path} carries no {TS_META_FILE}: not exported by icd export")
    return json.loads(extra[TS_META_FILE])


class ExportedDetector:
    """An exported model behind the `predict(images)` interface `evaluate_model` and `icd predict` use."""

    training = False

    def __init__(self, path: str | Path, threads: int | None = None):
        self.path = Path(path)
        self.meta = read_export_meta(self.path)
        self.format = self.meta["format"]
        if self.format == "onnx":
            import onnxruntime as ort

            options = ort.SessionOptions()
            if threads:
                options.intra_op_num_threads = threads
                options.inter_op_num_threads = 1
            self._session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        else:
            self._module = _jit_load(self.path).eval()

    def run(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One image [3, H, W] in 0..1 -> (boxes, scores, labels) as CPU tensors."""
        image = image.detach().float().cpu().contiguous()
        if self.format == "onnx":
            boxes, scores, labels = self._session.run(None, {"image": image.numpy()})
            return torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(labels).long()
        with torch.inference_mode():
            boxes, scores, labels = self._module(image)
        return boxes, scores, labels

    def predict(self, images: Sequence[Tensor]) -> list[dict[str, Tensor]]:
        out = []
        for image in images:
            boxes, scores, labels = self.run(image)
            out.append({"boxes": boxes, "scores": scores, "labels": labels})
        return out

    def eval(self) -> ExportedDetector:
        return self

    def train(self, mode: bool = True) -> ExportedDetector:
        return self


# --- verification -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tolerance:
    """When exported detections count as the eager ones (stated in every export's metadata).

    Every detection scoring at least `min_score` on one side needs a partner on the other with the
    same label, |score difference| <= `score` and a box that overlaps (IoU >= `iou`) or whose corners
    are all within `box_px` pixels (zero-area boxes have no IoU). Detections below `min_score` are left
    out because float rounding may move a score across the detector's own threshold, and so are those
    at the bottom of a list cut at the detector's `detections_per_img`, where rounding picks the tail.
    The bounds sit well above what ONNX Runtime's kernels change (scores ~1e-6, boxes ~1e-3 px on real
    photos) and well below what a one-pixel resize difference does; the AP check is only a backstop,
    since a weak model's whole AP can be under its tolerance.
    """

    iou: float = 0.999
    box_px: float = 0.05
    score: float = 1e-4
    min_score: float = 0.06
    ap: float = 0.1  # COCO AP points (percent) between eager and exported over the validation set


def _box_iou(a: Tensor, b: Tensor) -> Tensor:
    from torchvision.ops import box_iou

    if a.numel() == 0 or b.numel() == 0:
        return torch.zeros(a.shape[0], b.shape[0])
    return box_iou(a.float(), b.float()).nan_to_num(0.0)


def _unmatched(src: dict[str, Tensor], dst: dict[str, Tensor], tol: Tolerance, floor: float) -> tuple[int, float]:
    """(detections of src scoring >= floor without a partner in dst, largest corner offset of those matched)."""
    keep = src["scores"] >= floor
    boxes, scores, labels = src["boxes"][keep].float(), src["scores"][keep], src["labels"][keep]
    if boxes.shape[0] == 0:
        return 0, 0.0
    if dst["boxes"].numel() == 0:
        return int(boxes.shape[0]), 0.0
    iou = _box_iou(boxes, dst["boxes"])
    corner = (boxes[:, None, :] - dst["boxes"].float()[None, :, :]).abs().amax(-1)
    ok = (
        (labels[:, None] == dst["labels"][None, :])
        & ((scores[:, None] - dst["scores"][None, :]).abs() <= tol.score)
        & ((iou >= tol.iou) | (corner <= tol.box_px))
    )
    matched = ok.any(1)
    offsets = corner.masked_fill(~ok, float("inf")).amin(1)[matched]
    return int((~matched).sum()), float(offsets.max()) if offsets.numel() else 0.0


def _score_floor(a: dict[str, Tensor], b: dict[str, Tensor], tol: Tolerance, cap: int | None) -> float:
    """min_score, raised above the tail of a list that was cut at the detector's cap."""
    floor = tol.min_score
    for d in (a, b):
        if cap is not None and d["scores"].numel() >= cap:
            floor = max(floor, float(d["scores"].min()) + tol.score)
    return floor


def detection_cap(detector: Detector) -> int:
    """How many detections per image the detector keeps at most (torchvision's detections_per_img)."""
    owner = detector.model.roi_heads if detector.spec.detector == "faster_rcnn" else detector.model
    return int(owner.detections_per_img)


def compare_detections(
    eager: dict[str, Tensor], exported: dict[str, Tensor], tol: Tolerance, cap: int | None = None
) -> str | None:
    """None when the two detection sets agree within `tol`, else what differs (cap: detections_per_img)."""
    a = {k: eager[k].detach().cpu() for k in ("boxes", "scores", "labels")}
    b = {k: exported[k].detach().cpu() for k in ("boxes", "scores", "labels")}
    floor = _score_floor(a, b, tol, cap)
    (lost, _), (extra, _) = _unmatched(a, b, tol, floor), _unmatched(b, a, tol, floor)
    if lost or extra:
        n_a, n_b = int((a["scores"] >= floor).sum()), int((b["scores"] >= floor).sum())
        return (
            f"{lost} of {n_a} eager detections (score >= {floor:.3f}) have no exported match and {extra} of "
            f"{n_b} exported ones have no eager match"
        )
    return None


ImageId = int | str  # a dataset image id, or the name of a probe ("landscape 193x257")


@dataclass
class Verification:
    images: int
    tolerance: dict[str, float]
    shapes: list[list[int]] = field(default_factory=list)  # [H, W] of each compared image
    max_box_diff_px: float | None = None
    eager_AP: float | None = None
    exported_AP: float | None = None
    eval_images: int | None = None
    mismatches: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches


def _max_box_diff(eager: dict[str, Tensor], exported: dict[str, Tensor], tol: Tolerance, cap: int) -> float | None:
    """Largest corner offset (px) between an eager detection and its exported partner; None without any."""
    a = {k: eager[k].detach().cpu() for k in ("boxes", "scores", "labels")}
    b = {k: exported[k].detach().cpu() for k in ("boxes", "scores", "labels")}
    floor = _score_floor(a, b, tol, cap)
    if not bool((a["scores"] >= floor).any()):
        return None
    return _unmatched(a, b, tol, floor)[1]


def verify_export(
    detector: Detector,
    exported: ExportedDetector,
    images: Sequence[tuple[ImageId, Tensor]],
    tol: Tolerance = Tolerance(),
    val_dataset: Any | None = None,
) -> Verification:
    """Compare exported vs eager detections on `images` [(image_id, image)], then COCO AP on `val_dataset`."""
    from .evaluate import evaluate_model

    detector.eval()
    report = Verification(images=len(images), tolerance=asdict(tol))
    diffs: list[float] = []
    for image_id, image in images:
        report.shapes.append([int(image.shape[-2]), int(image.shape[-1])])
        with torch.inference_mode():
            eager = detector.predict([image])[0]
        got = exported.predict([image])[0]
        cap = detection_cap(detector)
        problem = compare_detections(eager, got, tol, cap)
        if problem:
            report.mismatches.append(f"image {image_id}: {problem}")
        diff = _max_box_diff(eager, got, tol, cap)
        if diff is not None:
            diffs.append(diff)
    report.max_box_diff_px = max(diffs) if diffs else None
    if val_dataset is not None:
        eager_ap = evaluate_model(detector, val_dataset, batch_size=1).metrics["AP"]
        exported_ap = evaluate_model(exported, val_dataset, batch_size=1).metrics["AP"]  # type: ignore[arg-type]
        report.eager_AP, report.exported_AP, report.eval_images = eager_ap, exported_ap, len(val_dataset)
        if abs(eager_ap - exported_ap) > tol.ap:
            report.mismatches.append(
                f"COCO AP {exported_ap:.3f} exported vs {eager_ap:.3f} eager on "
                f"{len(val_dataset)} images (tolerance {tol.ap})"
            )
    return report


def verification_probes(detector: Detector, images: Sequence[tuple[ImageId, Tensor]]) -> list[tuple[str, Tensor]]:
    """The first of `images` at shapes whose resize float32 arithmetic rounds unlike eager (see export_resize)."""
    transform = detector.model.transform
    source = images[0][1] if images else None
    return probe_images(source, int(max(transform.min_size)), int(transform.max_size))


def _check_verification(report: Verification, path: Path) -> None:
    if not report.ok:
        raise ExportError(
            f"{path}: the exported model does not reproduce the eager one: " + "; ".join(report.mismatches[:5])
        )


# --- the whole step ----------------------------------------------------------------------------------
@dataclass
class ExportResult:
    path: Path
    meta: dict[str, Any]
    verification: Verification


def export_detector(
    detector: Detector,
    checkpoint: dict[str, Any],
    fmt: str,
    path: str | Path,
    images: Sequence[tuple[ImageId, Tensor]],
    val_dataset: Any | None = None,
    tol: Tolerance = Tolerance(),
    source: str | None = None,
    opset: int = ONNX_OPSET,
) -> ExportResult:
    """Export, load the file back, verify it against the eager model, and embed the verification.

    Detections are compared on `images` and on `verification_probes` (the first image resampled to
    portrait, landscape, square and extreme shapes): a few validation photos of one shape can all
    resize alike in both modes and hide an export that resizes other shapes differently.
    The file only appears at `path` (with its metadata also beside it, see `meta_sidecar`) once it has
    passed; a failed verification raises ExportError and leaves nothing behind.
    """
    path = Path(path)
    meta = export_meta(detector, checkpoint, fmt, source)
    if fmt == "onnx":
        meta["opset"] = opset
    with tempfile.TemporaryDirectory(dir=path.parent if path.parent.exists() else None) as tmp:
        staged = Path(tmp) / f"model{SUFFIX.get(fmt, '')}"
        write_export(detector, meta, staged, opset=opset)
        exported = ExportedDetector(staged)
        checks = [*images, *verification_probes(detector, images)]
        report = verify_export(detector, exported, checks, tol, val_dataset)
        _check_verification(report, path)
        meta["verification"] = _jsonable(asdict(report))
        _embed_meta(staged, meta)
        path.parent.mkdir(parents=True, exist_ok=True)
        staged.replace(path)
    meta_sidecar(path).write_text(json.dumps(meta, indent=2))
    return ExportResult(path, meta, report)


def meta_sidecar(path: str | Path) -> Path:
    """`model.onnx.json` beside `model.onnx`: the embedded metadata, readable without onnx or torch."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def _embed_meta(path: Path, meta: dict[str, Any]) -> None:
    if meta["format"] == "onnx":
        write_onnx_meta(path, meta)
    else:
        module = _jit_load(path)
        torch.jit.save(module, str(path), _extra_files={TS_META_FILE: json.dumps(meta)})


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return obj


def validation_subset(dataset: Any, limit: int | None) -> Any:
    """The first `limit` images of a CocoDataset (all for None), still COCO-evaluable."""
    if limit is None or limit >= len(dataset):
        return dataset
    subset = copy.copy(dataset)
    subset.image_ids = dataset.image_ids[:limit]
    subset._boxes, subset._labels = dataset._boxes[:limit], dataset._labels[:limit]
    return subset


def readable_checkpoint(path: Path, read: Any) -> dict[str, Any]:
    """`read(path)`, with an unreadable file (truncated, not a torch file) named in a ValueError."""
    try:
        return read(path)
    except (FileNotFoundError, ValueError):
        raise
    except Exception as err:  # torch.load's pickle / zip errors say nothing about which file
        raise ValueError(
            f"{path} is not a readable checkpoint ({_first_line(err)}); give the final.pt "
            "of a finished train or distill run"
        ) from err


def export_checkpoint(
    checkpoint: str | Path,
    fmt: str,
    out: str | Path,
    cache_dir: str | Path,
    verify_images: int = 4,
    eval_images: int | None = None,
    opset: int = ONNX_OPSET,
    tol: Tolerance = Tolerance(),
) -> ExportResult:
    """Export a train/distill checkpoint's model (the student) and verify it on the run's validation set.

    The model is rebuilt at the run's evaluation size; detections are compared on the first
    `verify_images` validation images (plus `verification_probes` of the first) and COCO AP on the
    first `eval_images` (all for None).
    `out` is a file path, or a folder that receives `model.ts` / `model.onnx`.
    """
    from .data import build_dataset
    from .detectors import load_detector, read_checkpoint
    from .spec import DataSpec

    if fmt not in FORMATS:
        raise ExportError(f"format: {fmt!r} is not one of {', '.join(FORMATS)}")
    checkpoint = Path(checkpoint)
    run_spec = readable_checkpoint(checkpoint, read_checkpoint).get("spec") or {}
    if not run_spec.get("data"):
        raise ExportError(f"{checkpoint} records no run spec with data: export needs the validation set to verify")
    data = DataSpec.model_validate(run_spec["data"])
    detector, saved = load_detector(checkpoint, data.test_size, data.max_size)
    detector.eval()
    val = build_dataset(data.val, cache_dir, train=False)
    images = [(val.image_ids[i], val.load(i)[0]) for i in range(min(verify_images, len(val)))]
    out = Path(out)
    path = out if out.suffix in SUFFIX.values() else out / f"model{SUFFIX[fmt]}"
    return export_detector(
        detector,
        saved,
        fmt,
        path,
        images,
        validation_subset(val, eval_images),
        tol,
        source=str(checkpoint),
        opset=opset,
    )
