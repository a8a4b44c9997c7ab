"""Per-class box statistics of the training set, for ICD's fake instance queries (docs/method/icd.md#fake-instances).

The official release reads fixed COCO statistics; we compute them from the training annotations so
any dataset works, and cache them as JSON keyed by the annotation file's content hash.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..hashing import sha256_file
from .coco import CocoDataset

log = logging.getLogger(__name__)

FALLBACK_MEAN = 0.1  # normalized w/h for classes without any training box
FALLBACK_STD = 0.05
_CACHE_VERSION = 1


@dataclass
class ClassPriors:
    """freq [C] (sums to 1 when there is any box), wh_mean [C, 2] and wh_std [C, 2] of (w/img_w, h/img_h)."""

    freq: torch.Tensor
    wh_mean: torch.Tensor
    wh_std: torch.Tensor
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return int(self.freq.numel())

    def to(self, device: torch.device | str) -> ClassPriors:
        return ClassPriors(self.freq.to(device), self.wh_mean.to(device), self.wh_std.to(device), self.class_names)

    def to_dict(self) -> dict:
        return {
            "freq": self.freq.tolist(),
            "wh_mean": self.wh_mean.tolist(),
            "wh_std": self.wh_std.tolist(),
            "class_names": list(self.class_names),
        }

    @classmethod
    def from_dict(cls, d: dict) -> ClassPriors:
        return cls(
            freq=torch.tensor(d["freq"], dtype=torch.float32),
            wh_mean=torch.tensor(d["wh_mean"], dtype=torch.float32).reshape(-1, 2),
            wh_std=torch.tensor(d["wh_std"], dtype=torch.float32).reshape(-1, 2),
            class_names=list(d["class_names"]),
        )


def priors_from_dataset(dataset: CocoDataset) -> ClassPriors:
    """Compute the statistics over the dataset's training targets (crowd and degenerate boxes excluded)."""
    c = dataset.num_classes
    per_class: list[list[np.ndarray]] = [[] for _ in range(c)]
    for i in range(len(dataset)):
        boxes, labels = dataset.annotations(i)
        if len(boxes) == 0:
            continue
        h, w = dataset.image_size(i)
        wh = np.stack([(boxes[:, 2] - boxes[:, 0]) / w, (boxes[:, 3] - boxes[:, 1]) / h], axis=1)
        for k in np.unique(labels):
            per_class[int(k)].append(wh[labels == k])
    counts = np.zeros(c, dtype=np.float64)
    mean = np.full((c, 2), FALLBACK_MEAN, dtype=np.float64)
    std = np.full((c, 2), FALLBACK_STD, dtype=np.float64)
    for k, chunks in enumerate(per_class):
        if chunks:
            wh = np.concatenate(chunks).astype(np.float64)
            counts[k] = len(wh)
            mean[k] = wh.mean(axis=0)
            std[k] = wh.std(axis=0)
    total = counts.sum()
    freq = counts / total if total > 0 else counts
    return ClassPriors(
        freq=torch.tensor(freq, dtype=torch.float32),
        wh_mean=torch.tensor(mean, dtype=torch.float32),
        wh_std=torch.tensor(std, dtype=torch.float32),
        class_names=list(dataset.class_names),
    )


def compute_priors(dataset: CocoDataset, cache_dir: str | Path | None = None) -> ClassPriors:
    """Class priors of `dataset`, read from or written to a JSON cache.

    The cache lives in `cache_dir`, or next to the annotation file when None; a read-only folder (no
    write bit, or a failed write) just means no caching; trainers should pass their own cache folder.
    The key is the annotation file's SHA-256, so an edited file is recomputed.
    """
    sha = sha256_file(dataset.annotations_json)
    folder = Path(cache_dir) if cache_dir is not None else dataset.annotations_json.parent
    path = folder / f"{dataset.annotations_json.stem}.priors-{sha[:16]}.json"
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            if data.get("version") == _CACHE_VERSION and data.get("sha256") == sha:
                return ClassPriors.from_dict(data)
        except (OSError, ValueError, KeyError) as err:
            log.warning("ignoring unreadable priors cache %s: %s", path, err)
    priors = priors_from_dataset(dataset)
    if folder.is_dir() and not folder.stat().st_mode & 0o222:
        log.info("class priors not cached: %s is read-only", folder)  # respected even when running as root
        return priors
    payload = {"version": _CACHE_VERSION, "sha256": sha, **priors.to_dict()}
    tmp = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".priors-", suffix=".tmp")
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f)
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the whole new one
    except OSError as err:
        log.info("class priors not cached (%s): %s", folder, err)
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return priors
