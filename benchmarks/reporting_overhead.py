"""What metric reporting costs the training loop (target: at most 1 % of step time).

Two figures, measured in one process on a temporary SQLite database (or --database-url):
1. End to end: the same tiny training run (log_every=1, the worst case) with the DbReporter and with
   no callbacks, alternated --reps times; the ratio of median step times. On a shared CPU this is
   as noisy as the machine, so also:
2. Direct: the reporter's own time per training step (on_metrics + should_stop, with the database
   writes it triggers), divided by the median step time of the runs without it.

    .venv/bin/python benchmarks/reporting_overhead.py --reps 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TARGET = 1.01


def spec(iterations: int) -> dict:
    return {
        "kind": "train",
        "name": "overhead",
        "device": "cpu",
        "data": {
            "train": {"format": "shapes", "num_images": 16, "image_size": 64, "max_object": 32},
            "val": {"format": "shapes", "num_images": 2, "image_size": 64, "max_object": 32, "seed": 1},
            "min_size": 64,
            "max_size": 64,
            "workers": 0,
        },
        "model": {
            "detector": "retinanet",
            "backbone": "resnet18",
            "fpn_channels": 32,
            "levels": ["p3", "p4", "p5"],
            "head_convs": 1,
        },
        "schedule": {
            "iterations": iterations,
            "batch_size": 2,
            "warmup_iters": 0,
            "eval_every": 0,
            "checkpoint_every": 0,
            "log_every": 1,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()

    import torch

    from icd_core.runner import run_spec
    from icd_core.spec import parse_spec
    from store.artifacts import ArtifactStore
    from store.db import make_engine, session_factory, upgrade_database
    from store.jobs import claim_job, create_job
    from worker.reporter import DbReporter

    torch.set_num_threads(1)  # steadier step times on a shared machine
    tmp = Path(tempfile.mkdtemp(prefix="icd-overhead-"))
    db_url = args.database_url or f"sqlite:///{tmp / 'icd.db'}"
    upgrade_database(db_url)
    engine = make_engine(db_url)
    sessions = session_factory(engine)
    artifacts = ArtifactStore(tmp / "artifacts")
    the_spec = parse_spec(spec(args.iterations))

    def new_job() -> int:
        with sessions() as s:
            job = create_job(s, the_spec.model_dump(mode="json"), "train", "overhead", "cpu", [])
            claim_job(s, job.id, "bench")
            return job.id

    def run(with_reporter: bool) -> float:
        job_id = new_job()
        callbacks = [DbReporter(sessions, job_id, 1, artifacts)] if with_reporter else []
        result = run_spec(
            the_spec, output_dir=artifacts.job_dir(job_id), callbacks=callbacks, resume=False, cache_dir=tmp / "cache"
        )
        assert result.sec_per_step is not None
        return result.sec_per_step

    run(False)  # warm-up: dataset generation, allocator, first-call overheads
    plain, reported = [], []
    for rep in range(args.reps):  # ABBA order, so a drift in machine load hits both sides alike
        for with_reporter in (False, True) if rep % 2 == 0 else (True, False):
            (reported if with_reporter else plain).append(run(with_reporter))
    step = statistics.median(plain)
    ratio = statistics.median(reported) / step

    # Direct cost: drive the reporter exactly as the trainer does at log_every=1 (one on_metrics and
    # one should_stop per step) for as long as a real run lasts, so time-based flushes happen too.
    job_id = new_job()
    reporter = DbReporter(sessions, job_id, 1, artifacts)
    reporter.on_start(0, 10**9)
    metrics = {
        "loss": 1.0,
        "loss_cls": 0.5,
        "loss_box": 0.5,
        "lr": 0.01,
        "sec_per_step": step,
        "data_time": 0.001,
        "peak_memory_mb": 500.0,
    }
    n, spent, t_end = 0, 0.0, time.perf_counter() + max(10.0, 3 * args.iterations * step)
    while time.perf_counter() < t_end:
        n += 1
        t0 = time.perf_counter()
        reporter.on_metrics(n, metrics)
        reporter.should_stop()
        spent += time.perf_counter() - t0
        time.sleep(step)  # the "training step" between calls, so flushes are as frequent as in a run
    per_step = spent / n
    engine.dispose()

    print(f"database {db_url.split(':')[0]}, tiny RetinaNet-R18 on CPU, log_every=1, {args.reps} runs each")
    print(f"median step: {step * 1000:.1f} ms without reporting, {statistics.median(reported) * 1000:.1f} ms with")
    print(f"end-to-end ratio (with / without): {ratio:.4f}  (target <= {TARGET}; machine noise included)")
    print(
        f"reporter cost: {per_step * 1e6:.0f} us per step over {n} steps ({reporter.flushes} flushes) "
        f"= {per_step / step * 100:.3f} % of a step -> ratio {1 + per_step / step:.4f}"
    )


if __name__ == "__main__":
    main()
