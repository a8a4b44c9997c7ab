"""Where a distill run's ICD decoder starts from: fresh (the paper), a named one, or a cached pre-training.

`distill.icd.decoder` (a path or job:<id>) loads a decoder; `distill.icd.pretrain` looks the artifact up
by its key in `<cache>/icd_decoders/` and pre-trains only when it is missing, so a study pre-trains
once per teacher and every later child, seed or job with the same key reuses it.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .data import CocoDataset
from .data.loader import collate_detection
from .detectors import Detector
from .distill.icd import ICDDistiller
from .distill.icd_pretrain import (
    FeatureSource,
    PretrainResult,
    TeacherBatch,
    artifact_key,
    artifact_path,
    check_readiness,
    load_decoder,
    pretrain_decoder,
    save_artifact,
    teacher_batch,
)
from .engine import checkpoint as ckpt
from .spec import DistillJobSpec

log = logging.getLogger(__name__)


class _Batches(Sequence):
    """Unflipped training batches over fixed index lists, loaded on access (live teacher runs reread them)."""

    def __init__(self, dataset: CocoDataset, groups: list[list[int]]):
        self.dataset, self.groups = dataset, groups

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int):  # type: ignore[override]
        return collate_detection([self.dataset.load(j, flip=False) for j in self.groups[i]])


def split_for_pretraining(
    num_images: int, holdout: int, batch_size: int, seed: int
) -> tuple[list[list[int]], list[list[int]]]:
    """(training batches, held-out batches) of image indices: a seeded permutation, the first `holdout` held out."""
    if num_images < 2:
        raise ValueError("distill.icd.pretrain needs at least 2 training images (one held out)")
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed)).tolist()
    held = order[: min(holdout, num_images - 1)]
    rest = order[len(held) :]
    bs = max(1, batch_size)
    return [rest[i : i + bs] for i in range(0, len(rest), bs)], [held[i : i + bs] for i in range(0, len(held), bs)]


def run_pretraining(
    distiller: ICDDistiller,
    teacher: Detector,
    train_ds: CocoDataset,
    spec: DistillJobSpec,
    device: torch.device,
    feature_dir: Path | None,
) -> PretrainResult:
    opts = spec.distill.icd.pretrain
    assert opts is not None
    train_groups, held_groups = split_for_pretraining(
        len(train_ds), opts.holdout_images, opts.batch_size or spec.schedule.batch_size, opts.seed
    )
    source = FeatureSource(
        teacher, _Batches(train_ds, train_groups), device, feature_dir if opts.cache_features else None
    )
    holdout = [teacher_batch(teacher, b, device) for b in _Batches(train_ds, held_groups)]

    def progress(r: Any) -> None:
        log.info(
            "icd pretrain step %d: AUC %.3f, in-box mass %.3f (uniform %.3f, %.1fx), recall %.3f",
            r.step,
            r.auc,
            r.inbox_mass,
            r.inbox_uniform,
            r.inbox_ratio,
            r.real_recall,
        )

    rng = ckpt.capture_rng()  # a reused artifact must leave the student's run exactly as a fresh one
    try:
        return pretrain_decoder(distiller, source, holdout, opts, progress)
    finally:
        ckpt.restore_rng(rng)


def prepare_decoder(
    spec: DistillJobSpec,
    distiller: ICDDistiller,
    teacher: Detector,
    teacher_path: Path,
    train_ds: CocoDataset,
    cache_dir: Path,
    resolve: Callable[[str], Path],
    device: torch.device,
) -> dict[str, Any]:
    """Load or pre-train the decoder side of `distiller` as the spec asks; returns the summary record."""
    icd = spec.distill.icd
    if icd.decoder:
        path = resolve(icd.decoder) if icd.decoder.startswith("job:") else Path(icd.decoder)
        if not path.is_file():
            raise FileNotFoundError(f"distill.icd.decoder: {path} not found")
        record = load_decoder(distiller, path)
        return {"source": str(path), "reused": True, **record}
    if icd.pretrain is None:
        return {}
    data = {
        "train": spec.data.train.model_dump(mode="json"),
        "sizes": list(spec.data.train_sizes),
        "max_size": spec.data.max_size,
    }
    key = artifact_key(ckpt.sha256_file(teacher_path), data, icd)
    path = artifact_path(cache_dir, key)
    if path.is_file():
        record = load_decoder(distiller, path)
        log.info("icd decoder %s reused (pre-trained %s steps)", path, record.get("steps"))
        return {"source": str(path), "key": key, "reused": True, **record}
    distiller.to(device)
    teacher.to(device).eval()
    features = path.with_suffix("") / "features"
    result = run_pretraining(distiller, teacher, train_ds, spec, device, features)
    record = result.record()
    save_artifact(path, distiller, key, record)
    shutil.rmtree(features.parent, ignore_errors=True)
    log.info(
        "icd decoder pre-trained in %d steps (%.0f s, %s) -> %s", result.steps, result.seconds, result.stopped, path
    )
    return {"source": str(path), "key": key, "reused": False, **record}


def heldout_diagnostics(
    distiller: ICDDistiller,
    teacher: Detector,
    dataset: CocoDataset,
    batch_size: int,
    device: torch.device,
) -> Callable[[], dict[str, float]]:
    """Diagnostics of the decoder on the first validation batch (teacher features computed once), for
    every evaluation of an ICD run: icd_heldout_auc, _real_recall, _inbox_mass, _inbox_uniform, _loc_error."""
    cached: list[TeacherBatch] = []

    def measure() -> dict[str, float]:
        if not cached:
            first = list(range(min(len(dataset), max(1, batch_size))))
            cached.append(teacher_batch(teacher, _Batches(dataset, [first])[0], device))
        r = check_readiness(distiller, cached, step=0)
        values = {
            "icd_heldout_auc": r.auc,
            "icd_heldout_real_recall": r.real_recall,
            "icd_heldout_inbox_mass": r.inbox_mass,
            "icd_heldout_inbox_uniform": r.inbox_uniform,
            "icd_heldout_loc_error": r.loc_error,
        }
        return {k: float(v) for k, v in values.items() if v == v}  # NaN (no real query) left out

    return measure
