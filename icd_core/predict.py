"""Detections you can look at: run a model on image files, write COCO-format JSON and annotated PNGs.

A model is a checkpoint (rebuilt at its run's evaluation size, or an imported model's input size) or an
exported TorchScript / ONNX file (`icd export`); both answer `predict([image])` with 0-based labels,
mapped to the dataset's category ids and names from the checkpoint or the export's metadata.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from .data.coco import decode_rgb

PALETTE = [
    "#e6194b",
    "#3cb44b",
    "#4363d8",
    "#f58231",
    "#911eb4",
    "#42d4f4",
    "#f032e6",
    "#bfef45",
    "#fabed4",
    "#469990",
    "#9a6324",
    "#800000",
    "#aaffc3",
    "#808000",
    "#000075",
    "#ffd8b1",
]
DEFAULT_SCORE_MIN = 0.3  # drawn boxes; the JSON keeps every detection the model returns


@dataclass
class LoadedModel:
    """Something with `predict(images)`, plus how to name its labels."""

    model: Any
    class_names: list[str]
    label_to_cat_id: list[int]
    source: str


def load_model(path: str | Path, device: str = "cpu") -> LoadedModel:
    """A checkpoint (.pt) or an exported model (.ts / .onnx), ready for `predict`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model not found: {path}")
    if path.suffix in (".onnx", ".ts"):
        from .export import ExportedDetector

        exported = ExportedDetector(path)
        meta = exported.meta
        return LoadedModel(exported, list(meta["class_names"]), list(meta["label_to_cat_id"]), str(path))
    from .detectors import evaluation_sizes, load_detector, read_checkpoint
    from .export import readable_checkpoint

    size, max_size = evaluation_sizes(readable_checkpoint(path, read_checkpoint)) or (800, 1333)
    detector, ckpt = load_detector(path, size, max_size)
    detector.to(device).eval()
    n = detector.num_classes
    names = list(ckpt.get("class_names") or [f"class{i}" for i in range(n)])
    cat_ids = [int(c) for c in ckpt.get("label_to_cat_id") or range(1, n + 1)]
    return LoadedModel(detector, names, cat_ids, str(path))


def run_model(model: Any, image: Tensor) -> dict[str, Tensor]:
    """One image [3, H, W] in 0..1 -> CPU detections (boxes xyxy, scores, labels 0-based)."""
    device = next(model.parameters()).device if isinstance(model, torch.nn.Module) else torch.device("cpu")
    with torch.inference_mode():
        out = model.predict([image.to(device)])[0]
    return {k: out[k].detach().float().cpu() if k != "labels" else out[k].detach().cpu() for k in out}


def to_pil(image: Tensor) -> Image.Image:
    """An image [3, H, W] in 0..1 as an 8-bit RGB PIL image."""
    array = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array, mode="RGB")


def draw_detections(
    image: Tensor, detections: dict[str, Tensor], class_names: Sequence[str], score_min: float = DEFAULT_SCORE_MIN
) -> Image.Image:
    """The image with a labeled box ("name 0.87") per detection scoring at least `score_min`."""
    canvas = to_pil(image)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    width = max(1, round(min(canvas.size) / 200))
    order = torch.argsort(detections["scores"])  # best last, so it is drawn on top
    for i in order.tolist():
        score = float(detections["scores"][i])
        if score < score_min:
            continue
        label = int(detections["labels"][i])
        color = PALETTE[label % len(PALETTE)]
        x1, y1, x2, y2 = (float(v) for v in detections["boxes"][i])
        draw.rectangle([x1, y1, x2, y2], outline=color, width=width)
        name = class_names[label] if 0 <= label < len(class_names) else str(label)
        text = f"{name} {score:.2f}"
        left, top, right, bottom = draw.textbbox((x1, y1), text, font=font)
        ty = y1 - (bottom - top) - 2 if y1 - (bottom - top) - 2 >= 0 else y1
        draw.rectangle([x1, ty, x1 + (right - left) + 4, ty + (bottom - top) + 2], fill=color)
        draw.text((x1 + 2, ty), text, fill="white", font=font)
    return canvas


def coco_detections(
    images: Sequence[dict[str, Any]],
    detections: Sequence[dict[str, Tensor]],
    class_names: Sequence[str],
    label_to_cat_id: Sequence[int],
) -> dict[str, Any]:
    """A COCO file (images, categories, annotations with `score`): `pycocotools.coco.COCO(path)` opens it,
    and its `annotations` list is a results list for `COCO.loadRes`."""
    annotations = []
    for info, det in zip(images, detections, strict=True):
        for box, score, label in zip(
            det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist(), strict=True
        ):
            x1, y1, x2, y2 = box
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": info["id"],
                    "category_id": int(label_to_cat_id[label]),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "score": float(score),
                    "iscrowd": 0,
                }
            )
    categories = [{"id": int(c), "name": n} for c, n in zip(label_to_cat_id, class_names, strict=True)]
    return {"images": list(images), "categories": categories, "annotations": annotations}


@dataclass
class WrittenPredictions:
    """What `write_predictions` wrote, and per image how many boxes reached the drawing threshold."""

    path: Path
    pngs: list[Path]
    drawn: list[int]  # boxes scoring at least score_min, per image (what its PNG shows)
    best: list[float | None]  # the image's top score (None: the model returned nothing)
    score_min: float

    def undrawn_lines(self) -> list[str]:
        """One line per image whose PNG has no box, so an empty picture is never a silent surprise."""
        lines = []
        for png, drawn, best in zip(self.pngs, self.drawn, self.best, strict=True):
            if drawn == 0:
                top = "no detections at all" if best is None else f"best score {best:.3f}"
                lines.append(f"{png.name}: no box scored at least --score-min {self.score_min:g} ({top})")
        return lines


def write_predictions(
    loaded: LoadedModel,
    images: Sequence[tuple[int, str, Tensor]],
    out_dir: str | Path,
    score_min: float = DEFAULT_SCORE_MIN,
    raw: bool = False,
) -> WrittenPredictions:
    """Predict on [(image_id, file_name, image)], write detections.json and one PNG per image; with `raw`,
    also the image without boxes as raw/<name>.png (a viewer draws the boxes itself, by class)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if raw:
        (out / "raw").mkdir(exist_ok=True)
    infos, dets, pngs = [], [], []
    for image_id, file_name, image in images:
        det = run_model(loaded.model, image)
        infos.append(
            {"id": int(image_id), "file_name": file_name, "height": int(image.shape[-2]), "width": int(image.shape[-1])}
        )
        dets.append(det)
        png = out / f"{Path(file_name).stem}.png"
        draw_detections(image, det, loaded.class_names, score_min).save(png)
        if raw:
            to_pil(image).save(out / "raw" / png.name)
        pngs.append(png)
    path = out / "detections.json"
    tmp = path.with_suffix(".json.tmp")
    coco = coco_detections(infos, dets, loaded.class_names, loaded.label_to_cat_id)
    coco["info"] = {"drawn_score_min": score_min}  # the threshold of the PNGs' boxes, for viewers to match
    tmp.write_text(json.dumps(coco))
    tmp.replace(path)
    drawn = [int((d["scores"] >= score_min).sum()) for d in dets]
    best = [float(d["scores"].max()) if d["scores"].numel() else None for d in dets]
    return WrittenPredictions(path, pngs, drawn, best, score_min)


def predict_files(
    model_path: str | Path,
    image_paths: Sequence[str | Path],
    out_dir: str | Path,
    device: str = "cpu",
    score_min: float = DEFAULT_SCORE_MIN,
) -> WrittenPredictions:
    """`icd predict`: image files (ids 1..n in the order given) through a checkpoint or an export."""
    loaded = load_model(model_path, device)
    images = []
    for i, p in enumerate(image_paths, start=1):
        p = Path(p)
        if not p.is_file():
            raise FileNotFoundError(f"image not found: {p}")
        try:
            images.append((i, p.name, decode_rgb(p).float().div_(255.0)))
        except Exception as err:
            raise ValueError(f"{p}: not an image PIL or torchvision can decode ({err})") from err
    return write_predictions(loaded, images, out_dir, score_min)
