"""Data-parallel scaling: step time and throughput of an N-rank torchrun group against one process.

Each configuration trains the same RetinaNet (GroupNorm, so ranks need no BN sync) on generated
shapes images for --steps steps through `icd_core.ddp_main`: one plain process for the baseline,
`torchrun --standalone --nproc-per-node N` for a group (gloo on CPU, nccl on GPUs). Step time is the
trainer's own median steady-state step (rank 0's sec_per_step), throughput = global batch / step time.
Two regimes, both printed:
  strong: the global batch stays --batch-size (each rank takes batch/N): the same job, done faster?
  weak:   each rank keeps --batch-size (global batch N x): more images per second?
Scaling efficiency = throughput(N) / (N x throughput(1)). On CPU every rank gets --threads threads.

    .venv/bin/python benchmarks/ddp_scaling.py [--ranks 2 --steps 20 --batch-size 4 --device cpu]
    .venv/bin/python benchmarks/ddp_scaling.py --device cuda --ranks 1,2,4   # a GPU host
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

WIDTHS = (8, 6, 14, 9, 9, 10, 12)


def spec(device: str, steps: int, global_batch: int, gpus: int, image_size: int, backbone: str) -> dict[str, Any]:
    shapes = {
        "format": "shapes",
        "image_size": image_size,
        "num_images": 64,
        "min_object": 8,
        "max_object": image_size // 2,
        "max_objects": 4,
    }
    return {
        "kind": "train",
        "name": "ddp-scaling",
        "seed": 0,
        "device": device,
        "data": {
            "train": {**shapes, "seed": 1},
            "val": {**shapes, "num_images": 4, "seed": 2},
            "min_size": image_size,
            "max_size": image_size,
            "workers": 0,
        },
        "model": {
            "detector": "retinanet",
            "backbone": backbone,
            "norm": "gn",
            "fpn_channels": 64,
            "levels": ["p3", "p4", "p5"],
            "anchor_sizes": [16, 32, 64],
            "head_convs": 2,
        },
        "schedule": {
            "iterations": steps,
            "batch_size": global_batch,
            "lr": 0.01,
            "warmup_iters": 0,
            "eval_every": 0,
            "checkpoint_every": 0,
            "log_every": 5,
        },
        "resources": {"gpus": gpus},
    }


def run(tmp: Path, name: str, job: dict[str, Any], ranks: int, threads: int) -> float:
    """Train `job` with `ranks` processes (1: no torchrun); rank 0's median step time in seconds."""
    spec_path, out = tmp / f"{name}.json", tmp / name
    spec_path.write_text(json.dumps(job))
    entry = ["-m", "icd_core.ddp_main", str(spec_path), str(out), "--cache-dir", str(tmp / "cache")]
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)] if ranks > 1 else []
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, *launcher, *entry], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-4000:]}")
    return float(json.loads((out / "summary.json").read_text())["sec_per_step"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="2", help="group sizes to compare with 1, e.g. 2 or 2,4")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per process (CPU)")
    args = parser.parse_args()
    sizes = [int(n) for n in args.ranks.split(",") if int(n) > 1]
    b = args.batch_size

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        mk = lambda gb, n: spec(args.device, args.steps, gb, n, args.image_size, args.backbone)  # noqa: E731
        base = run(tmp, "one", mk(b, 1), 1, args.threads)
        base_weak = {n: run(tmp, f"one-b{b // n}", mk(b // n, 1), 1, args.threads) for n in sizes if b % n == 0}
        print(
            f"device {args.device}, {args.steps} steps, image {args.image_size}px, {args.backbone}, "
            f"{args.threads} thread(s) per process"
        )
        header = ("regime", "ranks", "global batch", "step s", "img/s", "speed-up", "efficiency")
        print("".join(f"{h:<{w}}" if i == 0 else f"{h:>{w}}" for i, (h, w) in enumerate(zip(header, WIDTHS))))
        print(f"{'base':<8}{1:>6}{b:>14}{base:>9.3f}{b / base:>9.2f}{1.0:>10.2f}{1.0:>12.2f}")
        for n in sizes:
            if b % n == 0:  # strong: same global batch, b/n per rank
                t = run(tmp, f"strong-{n}", mk(b, n), n, args.threads)
                speed = base / t
                print(f"{'strong':<8}{n:>6}{b:>14}{t:>9.3f}{b / t:>9.2f}{speed:>10.2f}{speed / n:>12.2f}")
            t = run(tmp, f"weak-{n}", mk(b * n, n), n, args.threads)  # weak: b per rank
            gain = (b * n / t) / (b / base)
            print(f"{'weak':<8}{n:>6}{b * n:>14}{t:>9.3f}{b * n / t:>9.2f}{gain:>10.2f}{gain / n:>12.2f}")
        for n, t1 in base_weak.items():
            print(f"(1 process at batch {b // n}, one rank's share in strong {n}: {t1:.3f} s/step)")


if __name__ == "__main__":
    main()
