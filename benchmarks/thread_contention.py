"""The demo teacher's training step with and without a busy process beside it, at torch's default
thread count (one per core) and at the worker's new default (worker.threads, `icd serve`'s case).

Four figures, each in a fresh process so thread pools start clean: (a) quiet at the old default,
(b) quiet at the new default, (c) one busy single-threaded process beside, old default, (d) busy,
new default; then busy/quiet for both. Target: (d) / (b) <= 1.5. The step is the trainer's own
(forward with losses, backward, clipping, SGD) on the model of examples/teacher_shapes.yaml (the spec
scripts/demo.py submits) and one fixed batch of its data (batch 8, 128 px); only the number of
generated images is cut, to 16, since one batch is all a step sees. --rounds > 1 alternates the order
so a drift in machine load hits every case alike; the median step over all rounds is reported.

    .venv/bin/python benchmarks/thread_contention.py                 # spinning python beside
    .venv/bin/python benchmarks/thread_contention.py --busy matmul   # a 1-thread torch matmul loop
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TEACHER_SPEC = REPO / "examples" / "teacher_shapes.yaml"
TARGET = 1.5
BUSY = {
    "spin": "while True: pass",
    "matmul": ("import torch; torch.set_num_threads(1); a = torch.randn(512, 512)\nwhile True: a = (a @ a).tanh_()"),
}


def _child_env() -> dict[str, str]:
    """No OpenMP pin from the caller: 'old default' must be torch's own choice."""
    return {
        k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ICD_WORKER_THREADS")
    }


def measure(threads: int, steps: int, warmup: int, cache: Path) -> dict[str, object]:
    """In this process: build the demo teacher's trainer and time `steps` steps on one batch."""
    import torch
    import yaml

    from icd_core.data import build_dataset
    from icd_core.data.loader import make_loader
    from icd_core.runner import build_trainer
    from icd_core.spec import parse_spec

    if threads:
        torch.set_num_threads(threads)
    raw = yaml.safe_load(TEACHER_SPEC.read_text())
    raw["device"] = "cpu"
    raw["data"]["workers"] = 0
    raw["data"]["train"]["num_images"] = raw["data"]["val"]["num_images"] = 16
    spec = parse_spec(raw)
    with tempfile.TemporaryDirectory() as out:
        trainer, _ = build_trainer(spec, Path(out), cache_dir=cache)
        ds = build_dataset(spec.data.train, cache, train=True)
        images, targets = next(iter(make_loader(ds, spec.schedule.batch_size, shuffle=False)))
        trainer._set_train_mode()
        times, cpu = [], []
        for i in range(warmup + steps):
            t0, c0 = time.perf_counter(), time.process_time()
            losses = trainer._compute_losses(images, targets)
            trainer._optimize(sum(losses.values()))
            if i >= warmup:
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
    return {"threads": torch.get_num_threads(), "times": times, "cpu": cpu}


def run_case(threads: int, busy: str | None, args: argparse.Namespace, cache: Path) -> dict[str, object]:
    """One case in a fresh process, with a busy process beside it for its whole life when asked."""
    spinner = subprocess.Popen([sys.executable, "-c", BUSY[busy]], env=_child_env()) if busy else None
    try:
        cmd = [sys.executable, __file__, "--child", str(threads), "--steps", str(args.steps)]
        cmd += ["--warmup", str(args.warmup), "--cache", str(cache)]
        load = os.getloadavg()[0]
        out = subprocess.run(cmd, env=_child_env(), capture_output=True, text=True, check=True, timeout=900)
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["load1"] = load
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="timed steps per case and round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--busy", choices=sorted(BUSY), default="spin")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cache", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.child, args.steps, args.warmup, args.cache)))
        return

    from worker.threads import choose_threads, usable_cores

    new = choose_threads(None, workers=1, api_beside=True, environ={})  # the embedded worker of `icd serve`
    cases = {
        "a quiet, old default": (0, None),
        "b quiet, new default": (new.threads, None),
        "c busy,  old default": (0, args.busy),
        "d busy,  new default": (new.threads, args.busy),
    }
    print(
        f"demo teacher step ({TEACHER_SPEC.relative_to(REPO)}, batch 8, 128 px), {usable_cores()} usable cores; "
        f"new default {new.threads} ({new.reason}); old default: torch's own; busy = {args.busy}; "
        f"{args.rounds} round(s) x {args.steps} steps (+{args.warmup} warm-up)"
    )
    times: dict[str, list[float]] = {name: [] for name in cases}
    cpu: dict[str, list[float]] = {name: [] for name in cases}
    seen: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as cache:
        for r in range(args.rounds):
            order = list(cases) if r % 2 == 0 else list(reversed(cases))
            for name in order:
                threads, busy = cases[name]
                res = run_case(threads, busy, args, Path(cache))
                times[name] += res["times"]  # type: ignore[arg-type]
                cpu[name] += res["cpu"]  # type: ignore[arg-type]
                seen[name] = int(res["threads"])  # type: ignore[call-overload]
                step_ms = " ".join(f"{t * 1000:.0f}" for t in res["times"])  # type: ignore[union-attr]
                print(f"round {r} {name} ({seen[name]} thr, load1 {res['load1']:.2f}): {step_ms} ms", flush=True)
    med = {name: statistics.median(v) for name, v in times.items()}
    low = {name: min(v) for name, v in times.items()}  # the step least disturbed by anything else
    # CPU time of the step's process: flat when only the wall time grows (a smaller share of the cores),
    # rising when threads burn cycles waiting for each other (spin-waits at the end of parallel regions).
    print("-- median (min) step wall time; median CPU time")
    for name in cases:
        print(
            f"{name}: {seen[name]} thread(s)  {med[name]:.3f} s/step  (min {low[name]:.3f})  "
            f"cpu {statistics.median(cpu[name]):.3f} s/step"
        )
    old_min = low["c busy,  old default"] / low["a quiet, old default"]
    new_min = low["d busy,  new default"] / low["b quiet, new default"]
    print(f"busy / quiet by min step: old default {old_min:.2f}, new default {new_min:.2f}")
    old_ratio = med["c busy,  old default"] / med["a quiet, old default"]
    new_ratio = med["d busy,  new default"] / med["b quiet, new default"]
    print(f"busy / quiet, old default ({seen['a quiet, old default']} thr): {old_ratio:.2f}")
    ok = "met" if new_ratio <= TARGET else "NOT met"
    print(
        f"busy / quiet, new default ({seen['b quiet, new default']} thr): {new_ratio:.2f}  (target <= {TARGET}: {ok})"
    )
    print(f"busy, old / new default: {med['c busy,  old default'] / med['d busy,  new default']:.2f}")


if __name__ == "__main__":
    main()
