"""Cost of one distillation step with ICD vs plain FPN imitation (FitNet) vs no distillation.

Same models, same batch, interleaved repetitions, median seconds per step; prints the ratios
ICD/fitnet (target ≤ 1.10) and ICD/none. A step is what the trainer does: student forward (losses +
FPN features), teacher backbone+FPN (distill runs only), distiller losses, one backward, gradient
clipping, SGD step (+ ICD's AdamW step).

    .venv/bin/python benchmarks/icd_step_cost.py                  # RetinaNet R50 → R18, 512 px, batch 2
    .venv/bin/python benchmarks/icd_step_cost.py --device cuda --size 800 --amp --teacher resnet101 \
        --student resnet50 --batch 8
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from functools import partial

import torch

from icd_core.detectors import Detector, build_detector
from icd_core.distill import build_distiller
from icd_core.distill.base import DistillBatch, Distiller
from icd_core.spec import DistillSpec, ModelSpec


def make_batch(n: int, size: int, num_classes: int, objects: int, seed: int, device: torch.device):
    """Random images (short side `size`, 4:3) with `objects` random boxes each."""
    g = torch.Generator().manual_seed(seed)
    h, w = size, size * 4 // 3
    images, targets = [], []
    for _ in range(n):
        images.append(torch.rand(3, h, w, generator=g).to(device))
        wh = torch.rand(objects, 2, generator=g) * torch.tensor([w * 0.4, h * 0.4]) + 16
        xy = torch.rand(objects, 2, generator=g) * (torch.tensor([w, h]) - wh)
        boxes = torch.cat([xy, xy + wh], dim=1)
        labels = torch.randint(0, num_classes, (objects,), generator=g)
        targets.append({"boxes": boxes.to(device), "labels": labels.to(device)})
    return images, targets


class Runner:
    """One method's distiller and optimizers around the shared student and teacher."""

    def __init__(self, method: str, teacher: Detector, student: Detector, amp: torch.dtype | None, steps: int):
        self.method = method
        self.teacher, self.student, self.amp = teacher, student, amp
        dspec = DistillSpec(method=method)
        dspec.icd.bypass_iters = 0  # time the full gradient path
        self.distiller: Distiller = build_distiller(dspec, teacher, student, steps, None)
        self.distiller.to(next(student.parameters()).device)
        own = self.distiller.make_optimizer(steps)
        params = list(student.parameters())
        if own is None:
            params += list(self.distiller.parameters())
        self.sgd = torch.optim.SGD(params, lr=1e-4, momentum=0.9, weight_decay=1e-4)
        self.own = own[0] if own is not None else None
        self.step_no = 0

    def autocast(self) -> contextlib.AbstractContextManager:
        dev = next(self.student.parameters()).device.type
        return torch.autocast(dev, dtype=self.amp) if self.amp is not None else contextlib.nullcontext()

    def step(self, images, targets) -> None:
        with self.autocast():
            out = self.student.forward_train(images, targets)
            losses = dict(out.losses)
            if self.method != "none":
                t = self.teacher.teacher_features(out.image_list, source=self.student)
                batch = DistillBatch(
                    out.features,
                    t,
                    out.targets,
                    [tuple(s) for s in out.image_list.image_sizes],
                    tuple(out.image_list.tensors.shape[-2:]),
                    self.step_no,
                    out.anchors,
                    out.anchors_per_level,
                )
                losses.update(self.distiller.losses(batch))
        total = sum(losses.values())
        self.sgd.zero_grad(set_to_none=True)
        if self.own is not None:
            self.own.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_value_(self.student.parameters(), 1.0)
        if self.own is not None:
            self.distiller.clip_gradients()
            self.own.step()
        self.sgd.step()
        self.step_no += 1


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model_spec(args: argparse.Namespace, backbone: str) -> ModelSpec:
    return ModelSpec(detector=args.detector, backbone=backbone, fpn_channels=args.channels, head_convs=args.head_convs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--detector", default="retinanet", choices=["retinanet", "fcos", "faster_rcnn"])
    ap.add_argument("--teacher", default="resnet50")
    ap.add_argument("--student", default="resnet18")
    ap.add_argument("--size", type=int, default=512, help="short side in px (long side ≤ 4/3 of it)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--objects", type=int, default=8, help="ground-truth boxes per image")
    ap.add_argument("--channels", type=int, default=256)
    ap.add_argument("--head-convs", type=int, default=4)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--methods", default="none,fitnet,icd")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (0: torch's default); 1 makes "
        "the CPU-time figures immune to other jobs on a shared machine",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    torch.manual_seed(0)
    num_classes = 80

    mk = partial(_model_spec, args)
    size = (args.size, args.size * 4 // 3)
    teacher = build_detector(mk(args.teacher), num_classes, args.size, size[1]).to(device).eval()
    teacher.requires_grad_(False)
    student = build_detector(mk(args.student), num_classes, args.size, size[1]).to(device).train()
    amp = torch.bfloat16 if args.amp else None
    methods = args.methods.split(",")
    runners = {m: Runner(m, teacher, student, amp, steps=1000) for m in methods}
    images, targets = make_batch(args.batch, args.size, num_classes, args.objects, 0, device)

    print(
        f"device={device} threads={torch.get_num_threads()} amp={'bf16' if amp else 'off'} "
        f"{args.detector} teacher={args.teacher} student={args.student} C={args.channels} "
        f"head_convs={args.head_convs} batch={args.batch} image={size[0]}x{size[1]} objects/img={args.objects}"
    )
    for r in runners.values():
        for _ in range(args.warmup):
            r.step(images, targets)
    sync(device)
    # Wall time, and on the CPU also this process's CPU time (robust when other jobs share the cores).
    wall: dict[str, list[float]] = {m: [] for m in methods}
    cpu: dict[str, list[float]] = {m: [] for m in methods}
    for rep in range(args.reps):
        order = methods if rep % 2 == 0 else list(reversed(methods))  # interleaved, alternating order
        for m in order:
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            runners[m].step(images, targets)
            sync(device)
            wall[m].append(time.perf_counter() - t0)
            cpu[m].append(time.process_time() - c0)
    clocks = [("wall", wall)] + ([("cpu", cpu)] if device.type == "cpu" else [])
    for name, times in clocks:
        med = {m: statistics.median(v) for m, v in times.items()}
        print(f"-- {name} time (median of {args.reps})")
        for m in methods:
            print(
                f"{m:>7}: {med[m]:.3f} s/step  ({args.batch / med[m]:.2f} img/s)  all: "
                + " ".join(f"{t:.3f}" for t in times[m])
            )
        low = {m: min(v) for m, v in times.items()}  # least disturbed repetition
        for other, note in (("fitnet", "   (target <= 1.10)"), ("none", "")):
            if "icd" in med and other in med:
                print(
                    f"ICD / {other:<6} = {med['icd'] / med[other]:.3f} (median)  "
                    f"{low['icd'] / low[other]:.3f} (min){note}"
                )


if __name__ == "__main__":
    main()
