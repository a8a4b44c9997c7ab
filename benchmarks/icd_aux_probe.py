"""Can ICD's decoder learn its auxiliary task on this teacher, and in how many steps?

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/icd_aux_probe.py TEACHER.pt SPEC.yaml \
        [--steps 3000] [--lr 1e-4] [--every 250]

Trains only what the auxiliary task trains (docs/method/icd.md#auxiliary-task: instance encoder, conditional
decoder, aux head) on the frozen teacher's FPN features of SPEC's training data, with ICD's own optimizer (AdamW,
the spec's lr and weight decay, global grad-norm clip; a constant lr here so the length of the probe
does not change it). No student, so a step costs one teacher forward and the decoder: the probe runs
far longer than a study child can. It prints, every --every steps, the identification accuracy (the
fake share of the queries, 5/6, means the head still calls everything fake), the identification and
localization losses (a constant predictor scores ln-loss 0.451 at rho = 5) and the real queries'
attention entropy against ln(keys), uniform attention.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from icd_core.data import build_dataset, compute_priors, make_train_loader
from icd_core.data.loader import infinite_batches
from icd_core.detectors import load_detector
from icd_core.distill.base import DistillBatch
from icd_core.distill.icd import ICDDistiller
from icd_core.spec import DistillJobSpec, load_spec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("teacher", help="teacher checkpoint (.pt)")
    ap.add_argument("spec", help="a distill or study spec: its data, schedule.batch_size and distill.icd are used")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--lr", type=float, default=None, help="default: the spec's distill.icd.lr")
    ap.add_argument("--every", type=int, default=250)
    ap.add_argument("--cache-dir", default=".icd/cache")
    args = ap.parse_args()

    spec = load_spec(args.spec)
    if not hasattr(spec, "distill"):
        raise SystemExit(f"{args.spec}: need a distill or study spec (it has no distill section)")
    torch.manual_seed(spec.seed)
    data = spec.data
    train = build_dataset(data.train, args.cache_dir, train=True, hflip=data.hflip)
    sizes = data.min_size if isinstance(data.min_size, int) else tuple(data.min_size)
    teacher, _ = load_detector(args.teacher, sizes, data.max_size)
    teacher.eval().requires_grad_(False)
    batch_size = spec.schedule.batch_size
    icd = ICDDistiller(spec.distill, teacher, teacher, args.steps, compute_priors(train, args.cache_dir), seed=0)
    trained = [*icd.encoder.parameters(), *icd.decoder.parameters(), *icd.aux_head.parameters()]
    lr = args.lr if args.lr is not None else spec.distill.icd.lr
    opt = torch.optim.AdamW(trained, lr=lr, weight_decay=spec.distill.icd.weight_decay)
    batches = infinite_batches(make_train_loader(train, batch_size, workers=min(data.workers, 1), seed=spec.seed))

    kind = "study" if not isinstance(spec, DistillJobSpec) else "distill"
    print(f"{kind} spec {args.spec}: {len(train)} training images, batch {batch_size}, lr {lr:g}, {args.steps} steps")
    window: dict[str, float] = {}
    keys = None
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        images, targets = next(batches)
        with torch.no_grad():
            image_list, targets = teacher.prepare(images, targets)
            feats = teacher.extract_features(image_list)
        batch = DistillBatch(
            feats,
            feats,
            targets,
            [tuple(s) for s in image_list.image_sizes],
            tuple(image_list.tensors.shape[-2:]),
            step=step,
        )
        out = icd.compute(batch)
        loss = out.losses["loss_icd_ident"] + out.losses["loss_icd_loc"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, spec.distill.icd.grad_clip)
        opt.step()
        keys = sum(f.shape[-2] * f.shape[-1] for f in feats.values())
        for name, value in {
            "ident_acc": out.stats["icd_ident_acc"],
            "ident": out.losses["loss_icd_ident"],
            "loc": out.losses["loss_icd_loc"],
            "entropy": out.stats["icd_attn_entropy"],
        }.items():
            window[name] = window.get(name, 0.0) + float(value.detach())
        if step % args.every == 0 or step == args.steps:
            n = args.every if step % args.every == 0 else step % args.every
            means = {k: v / n for k, v in window.items()}
            print(
                f"step {step:>5}: ident acc {means['ident_acc']:.3f}  loss ident {means['ident']:.3f}  "
                f"loss loc {means['loc']:.3f}  attention entropy {means['entropy']:.3f} "
                f"(uniform {math.log(keys):.3f})  {time.perf_counter() - start:.0f} s",
                flush=True,
            )
            window = {}


if __name__ == "__main__":
    main()
