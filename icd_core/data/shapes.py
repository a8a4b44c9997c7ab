"""A synthetic COCO-format detection dataset of coloured shapes, generated on the fly and cached.

It exists so experiments run without downloading COCO, yet is hard enough that a bigger model beats
a smaller one: several shape classes in colours unrelated to class, sizes from small to large,
distractor strokes and blobs that are not objects, partial occlusion (later shapes cover earlier
ones; objects more than 60% hidden lose their annotation), and a textured, noisy background.
Generation is deterministic per (parameters, image index): the same seed gives the same bytes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

GENERATOR_VERSION = 1
CLASS_NAMES = (
    "circle",
    "square",
    "triangle",
    "ring",
    "cross",
    "star",
    "diamond",
    "hexagon",
    "crescent",
    "pentagon",
    "semicircle",
    "arrow",
)
MAX_OCCLUDED = 0.6  # an object with more than this fraction hidden is not annotated
MANIFEST = "manifest.json"
ANNOTATIONS = "instances.json"
IMAGES = "images"


@dataclass(frozen=True)
class ShapesParams:
    num_images: int
    image_size: int
    seed: int
    num_classes: int = 6
    min_object: int = 8
    max_object: int = 96
    max_objects: int = 8

    def validate(self) -> None:
        if self.num_images < 1:
            raise ValueError("num_images must be >= 1")
        if not 1 <= self.num_classes <= len(CLASS_NAMES):
            raise ValueError(f"num_classes must be in 1..{len(CLASS_NAMES)}")
        if not 2 <= self.min_object <= self.max_object <= self.image_size:
            raise ValueError("need 2 <= min_object <= max_object <= image_size")
        if self.max_objects < 0:
            raise ValueError("max_objects must be >= 0")


def _regular_polygon(n: int, radius: float, phase: float) -> list[tuple[float, float]]:
    return [
        (0.5 + radius * math.cos(phase + 2 * math.pi * i / n), 0.5 + radius * math.sin(phase + 2 * math.pi * i / n))
        for i in range(n)
    ]


def _star(points: int = 5) -> list[tuple[float, float]]:
    out = []
    for i in range(2 * points):
        r = 0.5 if i % 2 == 0 else 0.2
        a = -math.pi / 2 + math.pi * i / points
        out.append((0.5 + r * math.cos(a), 0.5 + r * math.sin(a)))
    return out


# Unit-square polygons for the polygonal classes (x right, y down).
_POLYGONS = {
    "square": [(0, 0), (1, 0), (1, 1), (0, 1)],
    "triangle": [(0.5, 0), (1, 1), (0, 1)],
    "cross": [
        (0.35, 0),
        (0.65, 0),
        (0.65, 0.35),
        (1, 0.35),
        (1, 0.65),
        (0.65, 0.65),
        (0.65, 1),
        (0.35, 1),
        (0.35, 0.65),
        (0, 0.65),
        (0, 0.35),
        (0.35, 0.35),
    ],
    "star": _star(),
    "diamond": [(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)],
    "hexagon": _regular_polygon(6, 0.5, 0.0),
    "pentagon": _regular_polygon(5, 0.5, -math.pi / 2),
    "arrow": [(0, 0.35), (0.6, 0.35), (0.6, 0.08), (1, 0.5), (0.6, 0.92), (0.6, 0.65), (0, 0.65)],
}


def shape_mask(name: str, w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean [h, w] mask of one shape filling a w x h box (random mirroring where it changes the shape)."""
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    if name == "circle":
        draw.ellipse((0, 0, w - 1, h - 1), fill=255)
    elif name == "ring":
        draw.ellipse((0, 0, w - 1, h - 1), outline=255, width=max(2, round(0.2 * min(w, h))))
    elif name == "crescent":
        draw.ellipse((0, 0, w - 1, h - 1), fill=255)
        dx = 0.38 * w
        draw.ellipse((dx, -0.05 * h, w - 1 + dx, 1.05 * h), fill=0)
    elif name == "semicircle":
        draw.pieslice((0, 0, w - 1, 2 * h - 1), 180, 360, fill=255)
    else:
        pts = [(x * (w - 1), y * (h - 1)) for x, y in _POLYGONS[name]]
        draw.polygon(pts, fill=255)
    mask = np.asarray(canvas) > 127
    if name in ("arrow", "crescent") and rng.random() < 0.5:
        mask = mask[:, ::-1]
    if name in ("triangle", "semicircle", "pentagon") and rng.random() < 0.5:
        mask = mask[::-1, :]
    return mask


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth colour field plus finer texture, float32 [size, size, 3] in 0..255."""
    base = rng.uniform(40, 215, size=3)
    coarse_n = int(rng.integers(2, 6))
    coarse = rng.uniform(-60, 60, size=(coarse_n, coarse_n, 3)).astype(np.float32)
    fine = rng.uniform(-25, 25, size=(24, 24, 3)).astype(np.float32)
    out = np.empty((size, size, 3), dtype=np.float32)
    for c in range(3):
        lo = Image.fromarray(coarse[:, :, c], mode="F").resize((size, size), Image.BILINEAR)
        hi = Image.fromarray(fine[:, :, c], mode="F").resize((size, size), Image.BILINEAR)
        out[:, :, c] = base[c] + np.asarray(lo) + np.asarray(hi)
    return out


def _random_colour(rng: np.random.Generator, avoid: np.ndarray) -> tuple[int, int, int]:
    """A random colour not too close to `avoid` (the local background), so objects stay visible."""
    for _ in range(8):
        colour = rng.integers(0, 256, size=3)
        if np.abs(colour - avoid).sum() > 90:
            break
    return int(colour[0]), int(colour[1]), int(colour[2])


def _draw_clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, count: int) -> None:
    """Distractors that are not objects: strokes, arcs, elongated irregular blobs and dots."""
    for _ in range(count):
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
        kind = rng.integers(0, 4)
        x, y = rng.uniform(0, size, size=2)
        if kind == 0:
            length, angle = rng.uniform(0.1, 0.6) * size, rng.uniform(0, math.pi)
            draw.line(
                (x, y, x + length * math.cos(angle), y + length * math.sin(angle)),
                fill=colour,
                width=int(rng.integers(1, 4)),
            )
        elif kind == 1:
            r = rng.uniform(0.05, 0.3) * size
            start = float(rng.uniform(0, 360))
            draw.arc(
                (x - r, y - r, x + r, y + r),
                start,
                start + float(rng.uniform(40, 200)),
                fill=colour,
                width=int(rng.integers(1, 4)),
            )
        elif kind == 2:
            length, width = rng.uniform(0.06, 0.25) * size, rng.uniform(0.01, 0.04) * size
            angle = rng.uniform(0, math.pi)
            ca, sa = math.cos(angle), math.sin(angle)
            pts = []
            for i in range(9):
                t = 2 * math.pi * i / 9
                u, v = length * math.cos(t) * rng.uniform(0.7, 1.0), width * math.sin(t) * rng.uniform(0.5, 1.5)
                pts.append((x + u * ca - v * sa, y + u * sa + v * ca))
            draw.polygon(pts, fill=colour)
        else:
            r = rng.uniform(1, 3)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)


def _render_image(params: ShapesParams, index: int) -> tuple[np.ndarray, list[dict], int]:
    """One image (uint8 [S, S, 3]), its annotations and how many drawn objects were too occluded to keep.

    An annotation holds the label, the bbox (xywh) of the object's visible pixels, their count as
    area, and the visible fraction of the object.
    """
    rng = np.random.default_rng([params.seed, index, GENERATOR_VERSION])
    size = params.image_size
    canvas = Image.fromarray(np.clip(_background(rng, size), 0, 255).astype(np.uint8))
    _draw_clutter(ImageDraw.Draw(canvas), rng, size, int(rng.integers(3, 12)))
    pixels = np.array(canvas)
    owner = np.full((size, size), -1, dtype=np.int16)

    objects = []
    log_lo, log_hi = math.log(params.min_object), math.log(params.max_object)
    for k in range(int(rng.integers(0, params.max_objects + 1))):
        label = int(rng.integers(0, params.num_classes))
        side = math.exp(rng.uniform(log_lo, log_hi))  # log-uniform: small, medium and large objects
        aspect = math.exp(rng.uniform(-0.25, 0.25))
        w = int(np.clip(round(side * aspect), params.min_object, params.max_object))
        h = int(np.clip(round(side / aspect), params.min_object, params.max_object))
        x0, y0 = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
        mask = shape_mask(CLASS_NAMES[label], w, h, rng)
        local_bg = pixels[y0 + h // 2, x0 + w // 2].astype(np.int64)
        colour = np.array(_random_colour(rng, local_bg), dtype=np.float32)
        lo, hi = rng.uniform(0.75, 1.0), rng.uniform(0.95, 1.2)
        shade = np.linspace(lo, hi, w, dtype=np.float32)[None, :]  # a mild left-right shading gradient
        region = pixels[y0 : y0 + h, x0 : x0 + w]
        painted = np.clip(colour[None, None, :] * shade[..., None], 0, 255).astype(np.uint8)
        region[mask] = np.broadcast_to(painted, (h, w, 3))[mask]
        owner[y0 : y0 + h, x0 : x0 + w][mask] = k
        objects.append((k, label, x0, y0, w, h, int(mask.sum())))

    _draw_clutter(ImageDraw.Draw(canvas := Image.fromarray(pixels)), rng, size, int(rng.integers(0, 3)))
    pixels = np.asarray(canvas).astype(np.float32)
    pixels += rng.normal(0.0, 7.0, size=pixels.shape).astype(np.float32)
    image = np.clip(pixels, 0, 255).astype(np.uint8)

    anns, dropped = [], 0
    for k, label, x0, y0, w, h, total in objects:
        ys, xs = np.nonzero(owner[y0 : y0 + h, x0 : x0 + w] == k)
        if total == 0 or len(ys) < (1.0 - MAX_OCCLUDED) * total:
            dropped += 1
            continue
        bx, by = x0 + int(xs.min()), y0 + int(ys.min())
        bw, bh = int(xs.max() - xs.min()) + 1, int(ys.max() - ys.min()) + 1
        anns.append({"label": label, "bbox": [bx, by, bw, bh], "area": int(len(ys)), "visible": len(ys) / total})
    return image, anns, dropped


def _is_complete(out_dir: Path, params: ShapesParams) -> bool:
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return (
        manifest.get("complete") is True
        and manifest.get("generator_version") == GENERATOR_VERSION
        and manifest.get("params") == asdict(params)
        and (out_dir / ANNOTATIONS).is_file()
    )


def _generate(out_dir: Path, params: ShapesParams) -> None:
    images_dir = out_dir / IMAGES
    images_dir.mkdir(parents=True)
    coco: dict = {
        "info": {"description": f"icd_core synthetic shapes v{GENERATOR_VERSION}", **asdict(params)},
        "images": [],
        "annotations": [],
        "categories": [
            {"id": i + 1, "name": CLASS_NAMES[i], "supercategory": "shape"} for i in range(params.num_classes)
        ],
    }
    ann_id = 1
    for i in range(params.num_images):
        image, anns, _ = _render_image(params, i)
        name = f"{i:06d}.jpg"
        Image.fromarray(image).save(images_dir / name, format="JPEG", quality=92)
        coco["images"].append({"id": i + 1, "file_name": name, "width": params.image_size, "height": params.image_size})
        for a in anns:
            x, y, w, h = a["bbox"]
            coco["annotations"].append(
                {
                    "id": ann_id,
                    "image_id": i + 1,
                    "category_id": a["label"] + 1,
                    "bbox": a["bbox"],
                    "area": a["area"],
                    "iscrowd": 0,
                    "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
                }
            )
            ann_id += 1
    (out_dir / ANNOTATIONS).write_text(json.dumps(coco))
    manifest = {
        "complete": True,
        "generator_version": GENERATOR_VERSION,
        "params": asdict(params),
        "num_annotations": ann_id - 1,
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))


def make_shapes(
    out_dir: str | Path,
    num_images: int,
    image_size: int,
    seed: int,
    num_classes: int = 6,
    min_object: int = 8,
    max_object: int = 96,
    max_objects: int = 8,
) -> tuple[Path, Path]:
    """Generate (or reuse) a shapes dataset in `out_dir`; returns (images_dir, annotations_json).

    An existing complete dataset with the same parameters is returned as is. Generation happens in a
    temporary sibling folder renamed into place, so concurrent callers and crashes never leave a
    half-written dataset behind a complete-looking manifest. A folder holding something other than
    a shapes dataset is refused rather than overwritten.
    """
    params = ShapesParams(num_images, image_size, seed, num_classes, min_object, max_object, max_objects)
    params.validate()
    out_dir = Path(out_dir)
    result = (out_dir / IMAGES, out_dir / ANNOTATIONS)
    if _is_complete(out_dir, params):
        return result
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MANIFEST).exists():
        raise ValueError(f"{out_dir} is not empty and is not a shapes dataset; choose another folder")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _generate(tmp, params)
        if out_dir.exists():
            if _is_complete(out_dir, params):  # another process finished first
                return result
            shutil.rmtree(out_dir)  # an older or different shapes dataset (it has our manifest)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not _is_complete(out_dir, params):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return result
