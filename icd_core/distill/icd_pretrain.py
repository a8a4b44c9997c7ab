"""Decoder pre-training on the frozen teacher (PRETRAIN_TEACHER_ITERS; docs/method/icd.md#decoder-pre-training).

Why: the aux task's attention starts nearly uniform and sharpens per step; the paper gives the decoder
90k iterations, a CPU run a few hundred. Because the aux task sees only teacher features, a decoder
trained once for a teacher and a training set serves every student of that teacher, so the result is
an artifact keyed by (teacher checkpoint sha256, training data, ICD settings) and reused.

The loop trains only the instance encoder, decoder and aux head (AdamW at its own lr, constant or
cosine), and stops at the step budget or once the decoder is *ready* on held-out training images:
identification AUC ≥ `min_auc` and in-box attention mass ≥ `min_inbox_ratio` × uniform's.
Teacher features can be computed once and cached on disk (`cache_features`); the batches are then
fixed (no flip), and a live-teacher run over the same batches gives the same decoder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from icd_core.distill.base import DistillBatch
from icd_core.distill.icd_diagnostics import identification_auc
from icd_core.engine import checkpoint as ckpt
from icd_core.spec import INT32_MAX

if TYPE_CHECKING:
    from icd_core.detectors import Detector
    from icd_core.distill.icd import ICDDistiller
    from icd_core.spec import ICDOptions, ICDPretrainSpec

log = logging.getLogger(__name__)

DECODER_PREFIXES = ("encoder.", "decoder.", "aux_head.")
ARTIFACT_FORMAT = 1
HOLDOUT_STEP = INT32_MAX  # query sampling of the held-out check: fixed, never a training step's
Batch = tuple[list[Tensor], list[dict[str, Any]]]


# --- the artifact --------------------------------------------------------------------------------------
def artifact_key(teacher_sha256: str, data: Any, icd: ICDOptions) -> str:
    """sha256 of (teacher checkpoint sha256, training-data description, ICD settings that shape the decoder).

    The ICD fields that only matter for the student phase (lr, bypass, weight, chunking) stay out, so
    every child of a study shares one decoder; pretrain's own settings (lr, steps, thresholds, seed) are in.
    """
    shape_fields = ("heads", "layers", "neg_per_pos", "max_queries", "jitter", "temperature", "grad_clip")
    settings = {k: getattr(icd, k) for k in shape_fields}
    settings["pretrain"] = icd.pretrain.model_dump(mode="json") if icd.pretrain is not None else None
    blob = json.dumps({"teacher": teacher_sha256, "data": data, "icd": settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def artifact_path(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / "icd_decoders" / f"{key[:24]}.pt"


def decoder_state(distiller: ICDDistiller) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in distiller.state_dict().items() if k.startswith(DECODER_PREFIXES)}


def load_decoder(distiller: ICDDistiller, path: Path) -> dict[str, Any]:
    """Load the decoder side from a pre-training artifact or from an ICD distill checkpoint; returns its record.

    A distill checkpoint (`distiller` state) works too: `decoder: job:<id>` can name an earlier ICD run.
    """
    state = ckpt.load_checkpoint(path)
    if "decoder_state" in state:
        weights, record = state["decoder_state"], dict(state.get("record") or {})
    elif "distiller" in state and state.get("distill_method") == "icd":
        weights = {k: v for k, v in state["distiller"].items() if k.startswith(DECODER_PREFIXES)}
        record = {"source": "distill checkpoint", "step": state.get("step")}
    else:
        raise ValueError(f"distill.icd.decoder: {path} holds neither a pre-trained ICD decoder nor an ICD run")
    own = decoder_state(distiller)
    if set(weights) != set(own) or any(weights[k].shape != own[k].shape for k in own):
        raise ValueError(
            f"distill.icd.decoder: {path} was trained with other ICD settings (heads, layers, "
            "FPN width or classes differ); pre-train one for this teacher"
        )
    distiller.load_state_dict(weights, strict=False)
    return record


# --- teacher features ----------------------------------------------------------------------------------
@dataclass
class TeacherBatch:
    """One prepared batch on the teacher: FPN features plus the geometry and resized targets ICD needs."""

    features: OrderedDict[str, Tensor]
    targets: list[dict[str, Tensor]]
    image_sizes: list[tuple[int, int]]
    padded_size: tuple[int, int]

    def as_distill_batch(self, step: int) -> DistillBatch:
        return DistillBatch(self.features, self.features, self.targets, self.image_sizes, self.padded_size, step)


@torch.no_grad()
def teacher_batch(teacher: Detector, batch: Batch, device: torch.device) -> TeacherBatch:
    images, targets = batch
    images = [im.to(device) for im in images]
    targets = [{k: v.to(device) for k, v in t.items() if isinstance(v, Tensor)} for t in targets]
    image_list, prepared = teacher.prepare(images, targets)
    features = teacher.extract_features(image_list)
    return TeacherBatch(
        OrderedDict((k, v.detach()) for k, v in features.items()),
        [{"boxes": t["boxes"], "labels": t["labels"]} for t in prepared],
        [tuple(s) for s in image_list.image_sizes],
        tuple(image_list.tensors.shape[-2:]),
    )


class FeatureSource:
    """The i-th training batch's teacher features: computed live, or once and then read from `cache_dir`."""

    def __init__(
        self, teacher: Detector, batches: Sequence[Batch], device: torch.device, cache_dir: Path | None = None
    ):
        self.teacher, self.batches, self.device = teacher, batches, device
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.computed = 0  # teacher forward passes, for tests and cost reports

    def __len__(self) -> int:
        return len(self.batches)

    def get(self, index: int) -> TeacherBatch:
        if self.cache_dir is None:
            self.computed += 1
            return teacher_batch(self.teacher, self.batches[index], self.device)
        path = self.cache_dir / f"batch_{index:06d}.pt"
        if not path.is_file():
            self.computed += 1
            tb = teacher_batch(self.teacher, self.batches[index], self.device)
            ckpt.atomic_save(
                {
                    "features": dict(tb.features),
                    "targets": tb.targets,
                    "image_sizes": tb.image_sizes,
                    "padded_size": list(tb.padded_size),
                },
                path,
            )
            return tb
        saved = ckpt.load_checkpoint(path, map_location=self.device)  # the one reader (weights_only)
        return TeacherBatch(
            OrderedDict(saved["features"]),
            saved["targets"],
            [tuple(s) for s in saved["image_sizes"]],
            tuple(saved["padded_size"]),
        )


# --- the loop --------------------------------------------------------------------------------------------
@dataclass
class Readiness:
    step: int
    auc: float
    inbox_mass: float
    inbox_uniform: float
    real_recall: float
    loc_error: float

    @property
    def inbox_ratio(self) -> float:
        return self.inbox_mass / self.inbox_uniform if self.inbox_uniform > 0 else math.nan


@dataclass
class PretrainResult:
    steps: int
    seconds: float
    ready: bool
    stopped: str  # why it stopped: "ready" or "step budget"
    checks: list[Readiness] = field(default_factory=list)
    teacher_forwards: int = 0

    def record(self) -> dict[str, Any]:
        last = self.checks[-1] if self.checks else None
        return {
            "steps": self.steps,
            "seconds": self.seconds,
            "ready": self.ready,
            "stopped": self.stopped,
            "teacher_forwards": self.teacher_forwards,
            "final": {**asdict(last), "inbox_ratio": last.inbox_ratio} if last else None,
            "checks": [asdict(c) for c in self.checks],
        }


@torch.no_grad()
def check_readiness(distiller: ICDDistiller, holdout: Sequence[TeacherBatch], step: int) -> Readiness:
    """Held-out diagnostics pooled over the batches (AUC over all their queries; the rest weighted by reals)."""
    was_training = distiller.training
    distiller.eval()
    logits, real, valid = [], [], []
    sums = {"icd_inbox_mass": 0.0, "icd_inbox_uniform": 0.0, "icd_real_recall": 0.0, "icd_loc_error": 0.0}
    n_real = 0.0
    try:
        for i, tb in enumerate(holdout):
            _, stats = distiller.aux_step(tb.as_distill_batch(HOLDOUT_STEP - i))
            logits.append(stats["icd_logits"].flatten())
            real.append(stats["icd_real_mask"].flatten())
            valid.append(stats["icd_valid_mask"].flatten())
            count = float(stats["icd_queries_real"])
            if count:
                n_real += count
                for key in sums:
                    sums[key] += float(stats[key]) * count
    finally:
        distiller.train(was_training)
    auc = float(identification_auc(torch.cat(logits), torch.cat(real), torch.cat(valid)))
    mean = {k: v / n_real if n_real else math.nan for k, v in sums.items()}
    return Readiness(
        step, auc, mean["icd_inbox_mass"], mean["icd_inbox_uniform"], mean["icd_real_recall"], mean["icd_loc_error"]
    )


def is_ready(r: Readiness, opts: ICDPretrainSpec) -> bool:
    if opts.min_auc is None and opts.min_inbox_ratio is None:
        return False  # a pure step budget
    auc_ok = opts.min_auc is None or r.auc >= opts.min_auc
    inbox_ok = opts.min_inbox_ratio is None or r.inbox_ratio >= opts.min_inbox_ratio
    return bool(auc_ok and inbox_ok)


def pretrain_decoder(
    distiller: ICDDistiller,
    train: FeatureSource,
    holdout: Sequence[TeacherBatch],
    opts: ICDPretrainSpec,
    progress: Callable[[Readiness], None] | None = None,
) -> PretrainResult:
    """Train encoder + decoder + aux head on the teacher's features until ready or `opts.steps`.

    Batches cycle through `train` in order; AdamW (the ICD weight decay) at `opts.lr`, constant or cosine,
    the ICD global-norm clip. Seeds its own generator state so the result depends only on `opts.seed`.
    """
    if len(train) == 0:
        raise ValueError("distill.icd.pretrain: no training batches left after holding out images")
    params = distiller.decoder_parameters()
    optimizer = torch.optim.AdamW(params, lr=opts.lr, weight_decay=distiller.opts.weight_decay)
    total = opts.steps

    def factor(step: int) -> float:
        return 1.0 if opts.schedule == "constant" else 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    saved_seed = distiller.sample_seed
    distiller.sample_seed = int(opts.seed)  # pre-training's queries do not depend on the student's seed
    distiller.train()
    start = time.perf_counter()
    checks: list[Readiness] = []
    step, ready = 0, False
    try:
        batches: Iterator[int] = (i % len(train) for i in range(total))
        for index in batches:
            losses, _ = distiller.aux_step(train.get(index).as_distill_batch(step))
            loss = sum(losses.values())
            if not bool(torch.isfinite(loss)):
                raise ValueError(
                    f"distill.icd.pretrain diverged at step {step + 1} (loss {float(loss)}); "
                    "lower distill.icd.pretrain.lr"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, distiller.opts.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            if step % opts.check_every == 0 or step == total:
                checks.append(check_readiness(distiller, holdout, step))
                if progress is not None:
                    progress(checks[-1])
                if is_ready(checks[-1], opts):
                    ready = True
                    break
    finally:
        distiller.sample_seed = saved_seed
    return PretrainResult(
        step, time.perf_counter() - start, ready, "ready" if ready else "step budget", checks, train.computed
    )


def save_artifact(path: Path, distiller: ICDDistiller, key: str, record: dict[str, Any]) -> None:
    ckpt.atomic_save(
        {"format": ARTIFACT_FORMAT, "key": key, "decoder_state": decoder_state(distiller), "record": record}, path
    )
    path.with_suffix(".json").write_text(json.dumps({"key": key, **record}, indent=2, default=str) + "\n")
