"""Engine overhead: our Trainer's step time / a bare hand-written torchvision training loop.

Both loops train the same torchvision RetinaNet (same init, batch, SGD + warm-up LambdaLR) on the
same preloaded batches, cycled from memory so data loading is identical and free. The two loops
alternate step by step (a bare step runs between two trainer steps), so both see the same machine
load; each step is timed the same way, batch fetch to optimizer step. We print the median of the
per-pair ratios (robust to load drift on a shared machine) and the ratio of the medians.
Target: ratio <= 1.05.

    .venv/bin/python benchmarks/engine_overhead.py [--image-size 160 --batch-size 2 --steps 40]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import torch

from icd_core.data import CocoDataset, collate_detection, make_shapes
from icd_core.detectors import build_detector
from icd_core.engine.callbacks import Callback
from icd_core.engine.checkpoint import seed_everything
from icd_core.engine.schedule import make_lr_scheduler, make_sgd
from icd_core.engine.trainer import Trainer
from icd_core.spec import ModelSpec, ScheduleSpec

SKIP = 3  # warm-up steps dropped from each side


def preload(root: Path, image_size: int, batch_size: int, num_batches: int) -> list:
    images_dir, ann = make_shapes(
        root / "shapes",
        num_images=batch_size * num_batches,
        image_size=image_size,
        seed=0,
        min_object=8,
        max_object=image_size // 2,
        max_objects=6,
    )
    ds = CocoDataset(images_dir, ann, train=False)
    items = [ds.load(i) for i in range(len(ds))]
    return [collate_detection(items[i : i + batch_size]) for i in range(0, len(items), batch_size)]


class BareLoop:
    """The textbook torchvision loop: model(images, targets) -> sum -> backward -> step, one step per call."""

    def __init__(self, model: torch.nn.Module, schedule: ScheduleSpec, batches: list):
        self.model = model.train()
        self.opt = make_sgd([p for p in model.parameters() if p.requires_grad], schedule, schedule.lr)
        self.sched = make_lr_scheduler(self.opt, schedule)
        self.source = itertools.cycle(batches)
        self.times: list[float] = []

    def step(self) -> None:
        t0 = time.perf_counter()
        images, targets = next(self.source)
        loss_dict = self.model(images, targets)
        loss = sum(loss_dict.values())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        self.times.append(time.perf_counter() - t0)


class Interleave(Callback):
    """Runs one bare step between two trainer steps (should_stop is called once per trainer step,
    outside the trainer's step timing), so both loops see the same machine load."""

    def __init__(self, bare: BareLoop):
        self.bare = bare

    def should_stop(self) -> bool:
        self.bare.step()
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-size", type=int, default=160)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40, help="interleaved step pairs (the first 3 are warm-up)")
    ap.add_argument("--fpn-channels", type=int, default=64)
    args = ap.parse_args()

    spec = ModelSpec(
        detector="retinanet",
        backbone="resnet18",
        fpn_channels=args.fpn_channels,
        levels=["p3", "p4", "p5"],
        anchor_sizes=[16, 32, 64],
        head_convs=2,
    )
    # log every 20 steps (a real run's cadence: one host sync per window)
    schedule = ScheduleSpec(
        iterations=args.steps,
        batch_size=args.batch_size,
        lr=0.01,
        warmup_iters=5,
        eval_every=0,
        checkpoint_every=0,
        log_every=20,
        amp="off",
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        batches = preload(root, args.image_size, args.batch_size, num_batches=4)
        seed_everything(0)
        ours = build_detector(spec, 6, args.image_size, args.image_size)
        bare = BareLoop(copy.deepcopy(ours.model), schedule, batches)  # same torchvision RetinaNet, same init
        trainer = Trainer(
            ours,
            schedule,
            lambda start: itertools.cycle(batches),
            root / "run",
            torch.device("cpu"),
            callbacks=[Interleave(bare)],
        )
        trainer.train()
        ours_times, bare_times = trainer._step_times[SKIP:], bare.times[SKIP:]
    pair_ratios = [o / b for o, b in zip(ours_times, bare_times, strict=True)]
    bare_s, ours_s = statistics.median(bare_times), statistics.median(ours_times)
    print(
        f"retinanet resnet18 fpn{args.fpn_channels}, {args.image_size}px, batch {args.batch_size}, "
        f"{torch.get_num_threads()} threads, {len(pair_ratios)} interleaved steady step pairs"
    )
    print(f"bare torchvision loop : {bare_s * 1000:.1f} ms/step (median)")
    print(f"icd_core Trainer      : {ours_s * 1000:.1f} ms/step (median)")
    print(f"ratio of medians      : {ours_s / bare_s:.3f}")
    print(f"median pair ratio     : {statistics.median(pair_ratios):.3f}  (target <= 1.05)")


if __name__ == "__main__":
    main()
