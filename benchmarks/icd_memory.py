"""Peak memory of the ICD modules at batch 2 with 800×1333-equivalent keys (docs/method/icd.md#cost); asserts nothing.

Random FPN features of the right shapes (P3–P7 of an 800×1344 padded batch: S = 22,400 keys, C = 256)
and 50 ground-truth boxes per image (K = 300 queries each). On the CPU each phase is measured with the
profiler's memory timeline (every tensor allocation and free), so the peak is what the phase added on
top of what existed before it; on CUDA torch's allocator statistics give the same figure. Also counted:
bytes the autograd graph keeps for backward (saved-tensor hooks, storages counted once).

    .venv/bin/python benchmarks/icd_memory.py [--device cuda] [--chunks 64,300]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import warnings
from collections import OrderedDict
from types import SimpleNamespace

import torch

from icd_core.distill.base import DistillBatch
from icd_core.distill.icd import ICDDistiller
from icd_core.distill.icd_decoder import flatten_levels, instance_weights
from icd_core.spec import DistillSpec, ICDOptions, ModelSpec

PADDED = (800, 1344)
IMAGE = (800, 1333)
SHAPES = [(100, 168), (50, 84), (25, 42), (13, 21), (7, 11)]  # P3..P7 (stride 8..128)
MiB = 2**20


class Meter:
    """Peak bytes allocated inside a block: CUDA allocator stats, or the profiler's memory timeline on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> Meter:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        else:
            self.prof = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU],
                profile_memory=True,
                record_shapes=True,
                with_stack=True,
            )
            self.prof.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.before
            return
        self.prof.__exit__(*exc)
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = os.path.join(tmp, "timeline.json")
            self.prof.export_memory_timeline(path, device="cpu")
            with open(path) as f:
                _, sizes = json.load(f)
        self.peak = max((sum(row) for row in sizes), default=0) - (sum(sizes[0]) if sizes else 0)


class SavedBytes:
    """Bytes autograd saves for backward inside the block (each storage counted once)."""

    def __init__(self) -> None:
        self.storages: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        self.storages[st.data_ptr()] = st.nbytes()
        return t

    def __enter__(self) -> SavedBytes:
        self.ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.ctx.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def make_inputs(n: int, c: int, boxes: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    teacher = OrderedDict(
        (f"p{i + 3}", torch.randn(n, c, h, w, generator=g).to(device)) for i, (h, w) in enumerate(SHAPES)
    )
    student = OrderedDict(
        (k, torch.randn(v.shape, generator=g).to(device).requires_grad_()) for k, v in teacher.items()
    )
    targets = []
    for _ in range(n):
        wh = torch.rand(boxes, 2, generator=g) * 300 + 10
        xy = torch.rand(boxes, 2, generator=g) * (torch.tensor([IMAGE[1], IMAGE[0]]) - wh)
        targets.append(
            {
                "boxes": torch.cat([xy, xy + wh], 1).to(device),
                "labels": torch.randint(0, 80, (boxes,), generator=g).to(device),
            }
        )
    return student, teacher, targets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--channels", type=int, default=256)
    ap.add_argument("--boxes", type=int, default=50, help="GT boxes per image (50 → K = 300 with ρ = 5)")
    ap.add_argument("--chunks", default="16,64", help="query_chunk values to compare")
    args = ap.parse_args()
    device = torch.device(args.device)
    c, n = args.channels, args.batch
    det = SimpleNamespace(num_classes=80, channels=c, spec=ModelSpec(detector="retinanet", fpn_channels=c))
    student, teacher, targets = make_inputs(n, c, args.boxes, device)
    s_total = sum(h * w for h, w in SHAPES)
    print(f"device={device} N={n} C={c} S={s_total} keys, {args.boxes} GT/image")

    for chunk in [int(x) for x in args.chunks.split(",")]:
        torch.manual_seed(0)
        d = ICDDistiller(DistillSpec(icd=ICDOptions(bypass_iters=0, query_chunk=chunk)), det, det, 100, seed=0)
        d.to(device)
        batch = DistillBatch(student, teacher, targets, [IMAGE] * n, PADDED, step=0)
        d.compute(batch)  # warm-up: allocator pools, key layout cache
        for f in student.values():
            f.grad = None
        k = d.queries_for(batch).valid.shape[1]
        heads = d.heads

        # Decoder share: encoder + decoder + aux head forward and the aux backward.
        with Meter(device) as dec, SavedBytes() as dec_saved:
            tf, _ = flatten_levels(teacher)
            layout = d._key_layout(batch, SHAPES, device)
            q = d.queries_for(batch)
            g, proj = d.decoder(d.encoder(q.descriptors), tf, layout.pos, layout.valid)
            ident, loc, _ = d._aux_losses(d.aux_head(g).float(), q)
            (ident + loc).backward()
        del g, ident, loc
        # Attention weights for the distillation (no grad, chunked).
        with Meter(device) as wts:
            instance_weights(proj.q, proj.k, layout.valid, q.real, 1.0, chunk, max_real=args.boxes)
        del proj
        d.zero_grad(set_to_none=True)
        # The whole ICD step: all three losses and one backward (what the trainer runs).
        with Meter(device) as full, SavedBytes() as full_saved:
            losses = d.compute(batch).losses
            sum(losses.values()).backward()
        del losses
        for f in student.values():
            f.grad = None

        logits = n * heads * k * s_total * 4
        print(
            f"\nquery_chunk={chunk}  K={k}/image  (all logits at once would be {logits / MiB:.0f} MiB fp32; "
            f"one chunk {n * heads * min(chunk, args.boxes) * s_total * 4 / MiB:.0f} MiB)"
        )
        print(
            f"  decoder fwd+aux bwd : peak +{dec.peak / MiB:8.1f} MiB   "
            f"saved for backward {dec_saved.total / MiB:7.1f} MiB"
        )
        print(f"  attention weights   : peak +{wts.peak / MiB:8.1f} MiB")
        print(
            f"  full ICD loss + bwd : peak +{full.peak / MiB:8.1f} MiB   "
            f"saved for backward {full_saved.total / MiB:7.1f} MiB"
        )
        share = dec.peak / full.peak if full.peak > 0 else math.nan
        print(f"  decoder share of the ICD peak: {share:.0%}")


if __name__ == "__main__":
    main()
