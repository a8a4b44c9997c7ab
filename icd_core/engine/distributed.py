"""Data-parallel training in a torchrun group, with PyTorch's own DDP and collectives.

torchrun starts one process per device and sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR in its
environment; `RankGroup.join` opens the process group (nccl on CUDA, gloo on CPU) with a timeout, so a
lost peer fails a collective instead of hanging it. `DistributedTrainer` is the Trainer with the
group's rules added through its hooks:

- one `DistributedDataParallel` around the student *and* the distiller's trainable modules (ICD's
  encoder/decoder/aux head/adapter and their AdamW), without `find_unused_parameters` (every
  trainable parameter gets a gradient every step; docs/method/icd.md#release-defects);
- every rank reads its own slice of each global batch (`make_rank_train_loader`), so N ranks x
  batch_size/N see exactly the single-process batch, and DDP's gradient mean is its gradient;
- logged losses and the loss-spike guard's input are the mean over ranks (the global batch's); the
  stop vote is a MAX over ranks;
- rank 0 alone writes checkpoints, metrics and evaluations; a checkpoint also holds every rank's RNG
  state, so each rank resumes exactly where it stopped;
- evaluation is sharded over ranks and gathered on rank 0, which scores it and shares the result.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Subset

from ..data.coco import CocoDataset
from ..data.loader import derive_seed, make_batched_loader
from ..detectors import Detector
from ..evaluate import _Unaugmented, coco_evaluate, detection_record, loading_batches, predict_each_alone
from . import checkpoint as ckpt
from .callbacks import EvalResult
from .trainer import LossWindow, Trainer, _Loop, resolve_device

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 300.0  # a collective waits this long for a peer before failing the rank


TORCHRUN = (b"torch.distributed.run", b"torchrun")  # how torchrun's command line reads (module or script)


def die_with_parent(parent_cmd: tuple[bytes, ...] | None = None) -> None:
    """Linux: SIGKILL this process when its parent dies, so no rank outlives its launcher (torchrun
    itself does not kill its ranks when it is SIGKILLed). With `parent_cmd`, also exit now if the
    parent's command line shows none of them: it died before this call and the process was re-parented."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if parent_cmd is not None:
        try:
            cmdline = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
            alive = any(marker in cmdline for marker in parent_cmd)
        except OSError:
            alive = False
        if not alive:
            os._exit(1)


def in_torchrun() -> bool:
    """Whether this process was started by torchrun (or torch.distributed.run) as one rank of a group."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


@dataclass(frozen=True)
class RankGroup:
    """This process's place in the group and the device it trains on."""

    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def join(cls, device_request: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> RankGroup:
        """Open the default process group from torchrun's environment (one GPU per local rank)."""
        rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        device = resolve_device(device_request)
        if device.type == "cuda":
            if torch.cuda.device_count() <= local:
                raise ValueError(
                    f"resources.gpus: local rank {local} has no GPU (this host shows "
                    f"{torch.cuda.device_count()}); ask for fewer gpus"
                )
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        return cls(rank, world, local, device)

    def barrier(self) -> None:
        dist.barrier()

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (it fills shared caches), then the others."""
        if not self.is_main:
            dist.barrier()
        yield
        if self.is_main:
            dist.barrier()

    def reseed(self, seed: int) -> None:
        """Per-rank RNG after the shared seeding that built identical models: rank 0 keeps the
        stream a single process would have, rank r > 0 draws from (seed, r)."""
        if self.rank > 0:
            ckpt.seed_everything(derive_seed(seed, self.rank))

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def prepare_student(student: Detector, group: RankGroup) -> Detector:
    """SyncBatchNorm for BN students on GPUs. PyTorch's SyncBatchNorm has no CPU kernel, so on a CPU
    (gloo) group BN layers keep per-rank batch statistics; frozen BN and GroupNorm need nothing."""
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in student.modules())
    if not has_bn:
        return student
    if group.device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(student)
    log.warning("BatchNorm student on a CPU group: statistics stay per rank (SyncBatchNorm needs GPUs)")
    return student


class _LossForward(nn.Module):
    """The trainer's loss computation as one module's forward, so one DDP covers the student and the
    distiller together (DDP reduces only what runs inside its forward)."""

    def __init__(self, trainer: DistributedTrainer):
        super().__init__()
        self.student = trainer.student
        self.distiller = trainer.distiller
        self._trainer = [trainer]  # in a list: not registered as a submodule

    def forward(self, images: list[Tensor], targets: list[dict[str, Any]]) -> dict[str, Tensor]:
        return Trainer._compute_losses(self._trainer[0], images, targets)


class DistributedTrainer(Trainer):
    """A Trainer for one rank of a torchrun group (see the module docstring for what changes)."""

    def __init__(self, *args: Any, group: RankGroup, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.group = group
        self._ddp: DistributedDataParallel | None = None
        self._rank_rngs: list[Any] | None = None
        # The stop vote is a collective: every step on CPU, every few on GPUs (it syncs the host).
        self.stop_vote_every = 1 if self.device.type == "cpu" else 10

    def _before_train(self, resume_from: Path | None) -> _Loop:
        loop = super()._before_train(resume_from)
        ids = [self.device.index] if self.device.type == "cuda" else None
        # No per-step buffer broadcast: BN statistics are synced (SyncBN) or frozen, and GroupNorm has none.
        self._ddp = DistributedDataParallel(_LossForward(self), device_ids=ids, forward_sync_buffers=False)
        return loop

    def _compute_losses(self, images: list[Tensor], targets: list[dict[str, Any]]) -> dict[str, Tensor]:
        assert self._ddp is not None, "train() wraps the models before the first step"
        return self._ddp(images, targets)

    def _log(self, window: LossWindow, seconds: float, data_seconds: float) -> None:
        super()._log(self._mean_over_ranks(window), seconds, data_seconds)

    def _mean_over_ranks(self, window: LossWindow) -> LossWindow:
        """The window's losses averaged over ranks: the global batch's losses (one collective)."""
        names = list(window[-1][1].keys())
        stacked = torch.stack([torch.stack([lo[k].float() for k in names] + [t.float()]) for _, lo, t in window])
        dist.all_reduce(stacked)
        stacked /= self.group.world
        return [
            (step, dict(zip(names, row[:-1], strict=True)), row[-1])
            for (step, _, _), row in zip(window, stacked, strict=True)
        ]

    def _check_spike(self, step: int, losses: dict[str, Tensor], total: Tensor | float) -> None:
        """The spike guard sees the global batch's loss, so every rank reaches the same verdict (and
        skips the same checkpoints); one collective per new step."""
        if step <= self._guarded_step:
            return
        value = float(total.detach()) if isinstance(total, Tensor) else float(total)
        mean = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(mean)
        super()._check_spike(step, losses, float(mean.item()) / self.group.world)

    def _stop_requested(self) -> bool:
        last = self.step == self.total_steps
        if self.step % self.stop_vote_every and not last:
            return False
        vote = torch.tensor([1.0 if super()._stop_requested() else 0.0], device=self.device)
        dist.all_reduce(vote, op=dist.ReduceOp.MAX)
        return bool(vote.item() > 0)

    # --- checkpoints: gathered on every rank, written by rank 0 -----------------------------------
    def _save(self, path: Path, final: bool) -> None:
        rngs: list[Any] = [None] * self.group.world
        dist.all_gather_object(rngs, ckpt.capture_rng())
        self._rank_rngs = rngs
        if self.group.is_main:
            super()._save(path, final)
        self.group.barrier()  # a checkpoint reported at step k is one every rank has passed

    def _save_periodic(self) -> None:
        self._save(self.checkpoint_dir / ckpt.periodic_name(self.step), final=False)
        if self.group.is_main:
            ckpt.prune_periodic(self.checkpoint_dir, self.keep_checkpoints)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["world_size"] = self.group.world
        if self._rank_rngs is not None:
            state["rng_ranks"] = self._rank_rngs
        return state

    def load_checkpoint(self, path: Path) -> None:
        """Every rank loads the same file; then each takes back its own RNG state."""
        super().load_checkpoint(path)
        rngs = ckpt.load_checkpoint(path).get("rng_ranks")
        if rngs is not None and len(rngs) == self.group.world:
            ckpt.restore_rng(rngs[self.group.rank])
        elif self.group.rank > 0:
            log.warning(
                "%s was written by another group size: rank %d draws fresh RNG from (seed, rank, step)",
                path,
                self.group.rank,
            )
            ckpt.seed_everything(derive_seed(int((self.spec or {}).get("seed", 0)), self.group.rank, self.step))


def evaluate_sharded(
    detector: nn.Module,
    dataset: CocoDataset,
    group: RankGroup,
    batch_size: int = 4,
    workers: int = 0,
) -> EvalResult:
    """COCO-evaluate with every rank predicting images rank, rank+N, ...; rank 0 scores the gathered
    detections and every rank returns its result."""
    was_training = detector.training
    detector.eval()
    indices = list(range(group.rank, len(dataset), group.world))
    batches = loading_batches(len(indices), batch_size)
    shard = Subset(_Unaugmented(dataset), indices)
    detections: list[dict[str, Any]] = []
    try:
        with torch.inference_mode():
            for images, targets in make_batched_loader(shard, batches, workers=workers):
                outputs = predict_each_alone(detector, images, group.device)  # AP independent of batch and group
                detections.extend(detection_record(t, o) for t, o in zip(targets, outputs, strict=True))
    finally:
        detector.train(was_training)
    gathered: list[Any] = [None] * group.world
    dist.all_gather_object(gathered, detections)
    result: list[Any] = [None]
    if group.is_main:
        everything = [det for part in gathered for det in part]
        result[0] = coco_evaluate(dataset.coco, everything, dataset.label_to_cat_id, image_ids=dataset.image_ids)
    dist.broadcast_object_list(result, src=0)
    return result[0]
