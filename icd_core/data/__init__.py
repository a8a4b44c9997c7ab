"""Data: COCO-format datasets (real or generated shapes), class priors and resumable loaders."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from ..spec import CocoSource, ShapesSource
from .coco import CocoDataset, load_coco
from .loader import (
    ResumableSampler,
    collate_detection,
    infinite_batches,
    make_loader,
    make_train_loader,
)
from .priors import ClassPriors, compute_priors
from .shapes import CLASS_NAMES, GENERATOR_VERSION, ShapesParams, make_shapes
from .subset import subset_annotations

__all__ = [
    "CLASS_NAMES",
    "ClassPriors",
    "CocoDataset",
    "ResumableSampler",
    "ShapesParams",
    "build_dataset",
    "collate_detection",
    "compute_priors",
    "infinite_batches",
    "load_coco",
    "make_loader",
    "make_shapes",
    "make_train_loader",
    "resolve_source",
    "shapes_dir_for",
]


def _shapes_params(source: ShapesSource) -> ShapesParams:
    return ShapesParams(
        num_images=source.num_images,
        image_size=source.image_size,
        seed=source.seed,
        num_classes=source.num_classes,
        min_object=source.min_object,
        max_object=source.max_object,
        max_objects=source.max_objects,
    )


def shapes_dir_for(source: ShapesSource, cache_root: str | Path) -> Path:
    """The cache folder of a shapes source: cache_root/shapes-<hash of its parameters and generator version>."""
    key = json.dumps({"v": GENERATOR_VERSION, **asdict(_shapes_params(source))}, sort_keys=True)
    return Path(cache_root) / f"shapes-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def resolve_source(source: CocoSource | ShapesSource, cache_root: str | Path) -> tuple[Path, Path]:
    """(images_dir, annotations_json) of a spec data source, generating shapes into the cache if needed.

    A source with `subset` gets the cached annotation file of its part (icd_core.data.subset).
    """
    if isinstance(source, ShapesSource):
        images, annotations = make_shapes(shapes_dir_for(source, cache_root), **asdict(_shapes_params(source)))
    elif isinstance(source, CocoSource):
        images, annotations = Path(source.images), Path(source.annotations)
    else:
        raise TypeError(f"unknown data source {type(source).__name__}")
    if source.subset is not None:
        annotations = subset_annotations(annotations, source.subset, cache_root)
    return images, annotations


def build_dataset(
    source: CocoSource | ShapesSource, cache_root: str | Path, train: bool, hflip: float = 0.5
) -> CocoDataset:
    """Resolve a spec data source and open it as a CocoDataset."""
    images_dir, annotations_json = resolve_source(source, cache_root)
    return CocoDataset(images_dir, annotations_json, train=train, hflip=hflip)
