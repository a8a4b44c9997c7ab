"""The pruner's saving (issue 20, "Measure"): the same local sweep with a pruner and without one.

Runs `icd sweep`'s local runner (icd_core.sweep.run_sweep_local) on one sweep spec once per pruner, each
into its own folder under --out, with the spec's sampler and seed unchanged; only `pruner` differs. Then
prints, per pruner, the trials' total training steps, the wall time, the best metric and its parameters,
and the ratios against `none` (every trial trained to its end).

    OMP_NUM_THREADS=2 PYTHONPATH=. .venv/bin/python benchmarks/sweep_pruning.py \\
        --spec benchmarks/sweep_pruning.yaml --out runs/sweep-pruning

The step ratio is the robust figure: it does not depend on what else the machine runs. Wall times do.
With the random sampler (as in benchmarks/sweep_pruning.yaml) trial n has the same parameters in every
run; with TPE the trials after its startup ones would differ, since the model sees the pruned values.
Each finished run leaves its figures in <out>/<pruner>/bench.json; a rerun reports those instead of
running that pruner again (an interrupted run resumes, and its wall time then counts only this part).
Delete the folders to measure again.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

from icd_core.spec import SweepSpec, load_spec
from icd_core.sweep import report_markdown, run_sweep_local

PRUNERS: dict[str, dict[str, Any]] = {
    "none": {"kind": "none"},
    # The spec's own median settings are used when it has them (see with_pruner).
    "median": {"kind": "median", "startup_trials": 2, "warmup_steps": 0, "min_trials": 1},
    "successive_halving": {"kind": "successive_halving", "reduction_factor": 3},
}


def with_pruner(sweep: SweepSpec, kind: str) -> SweepSpec:
    """The sweep with only its pruner changed (successive halving's first rung: the first evaluation)."""
    pruner = dict(PRUNERS[kind])
    if sweep.pruner.kind == kind:
        pruner = sweep.pruner.model_dump(mode="json")
    if kind == "successive_halving":
        pruner.setdefault("min_resource", sweep.base.schedule.eval_every)
    data = sweep.model_dump(mode="json")
    data["pruner"] = pruner
    return SweepSpec.model_validate(data)


def run_one(sweep: SweepSpec, out: Path, cache: Path) -> dict[str, Any]:
    done = out / "bench.json"
    if done.is_file():
        return dict(json.loads(done.read_text()))
    t0 = time.perf_counter()
    report = run_sweep_local(sweep, out, cache)
    wall = time.perf_counter() - t0
    best = report["best"]
    result = {
        "pruner": sweep.pruner.model_dump(mode="json"),
        "steps_total": report["steps_total"],
        "wall_s": round(wall, 1),
        "counts": report["counts"],
        "best_value": best["value"] if best else None,
        "best_trial": best["number"] if best else None,
        "best_params": best["params"] if best else None,
        "trials": [
            {k: t[k] for k in ("number", "params", "status", "value", "steps", "reason")} for t in report["trials"]
        ],
        "report_md": str(out / "report.md"),
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    done.write_text(json.dumps(result, indent=2))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", default="benchmarks/sweep_pruning.yaml")
    ap.add_argument("--out", default="runs/sweep-pruning", help="one folder per pruner under it")
    ap.add_argument("--cache-dir", default=os.environ.get("ICD_CACHE_DIR", ".icd/cache"))
    ap.add_argument(
        "--pruners",
        default="none,median",
        help=f"comma-separated, run in this order; from {', '.join(PRUNERS)} (none is always run)",
    )
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    # The runner's log lines (each trial's start and parameters, a pruning decision) with their times.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    spec = load_spec(args.spec)
    if not isinstance(spec, SweepSpec):
        raise SystemExit(f"{args.spec} is a {spec.kind} spec, not a sweep")
    kinds = [k.strip() for k in args.pruners.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in PRUNERS]
    if unknown:
        raise SystemExit(f"unknown pruner(s) {unknown}; choose from {list(PRUNERS)}")
    if "none" not in kinds:
        kinds.insert(0, "none")
    out, cache = Path(args.out), Path(args.cache_dir)
    print(
        f"sweep {spec.name}: {spec.trials} trials over {', '.join(spec.space)}, sampler {spec.sampler.kind} "
        f"seed {spec.sampler.seed}; {spec.base.schedule.iterations} iterations, eval every "
        f"{spec.base.schedule.eval_every}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')}"
    )
    print(f"host: {platform.platform()}, {os.cpu_count()} CPUs", flush=True)

    results: dict[str, dict[str, Any]] = {}
    for kind in kinds:
        sweep = with_pruner(spec, kind)
        print(f"\n=== pruner {kind}: {json.dumps(sweep.pruner.model_dump(mode='json'))} -> {out / kind}", flush=True)
        results[kind] = r = run_one(sweep, out / kind, cache)
        print(report_markdown(json.loads((out / kind / "report.json").read_text())), flush=True)
        print(f"{kind}: {r['steps_total']} steps, {r['wall_s']:.0f} s", flush=True)

    metric = spec.metric
    base = results["none"]
    head = ["pruner", "trials (by status)", "total steps", "steps / none", "wall s", "wall / none", f"best {metric}"]
    print("\n| " + " | ".join([*head, "best trial", "best params"]) + " |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kind, r in results.items():
        counts = ", ".join(f"{n} {s}" for s, n in sorted(r["counts"].items()))
        params = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in (r["best_params"] or {}).items()
        )
        best = f"{r['best_value']:.2f}" if r["best_value"] is not None else "-"
        steps = f"{r['steps_total']} | {r['steps_total'] / max(1, base['steps_total']):.2f}"
        wall = f"{r['wall_s']:.0f} | {r['wall_s'] / max(1e-9, base['wall_s']):.2f}"
        print(f"| {kind} | {counts} | {steps} | {wall} | {best} | {r['best_trial']} | {params} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
