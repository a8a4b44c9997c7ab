"""Is ICD's decoder learning? Print its diagnostics from the metrics.jsonl of one or more ICD runs.

    .venv/bin/python benchmarks/icd_diagnostics.py RUN_DIR [RUN_DIR ...] [--every 100] [--keys 336]

Per logged step (every --every steps): the identification accuracy of the auxiliary head (it equals
the fake share of the queries, 5/6 at rho = 5, while the head still calls everything "fake"), the mean
attention entropy of the real queries in nats (ln(keys) is uniform attention: the instance weights
then carry no information), the aux and distillation losses, and the run's COCO evaluations. With
--keys the uniform entropy is printed for comparison (128 px images on P3-P5: 16² + 8² + 4² = 336).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from icd_core.engine.metrics_log import read_metrics_log

COLUMNS = ("icd_ident_acc", "icd_attn_entropy", "loss_icd_ident", "loss_icd_loc", "loss_icd_distill", "loss")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def report(folder: Path, every: int) -> None:
    records = read_metrics_log(folder)
    train = [r for r in records if r["type"] == "train" and "icd_ident_acc" in r]
    if not train:
        print(f"{folder}: no ICD metrics in metrics.jsonl (not an ICD run, or written before metrics.jsonl existed)")
        return
    print(f"\n{folder}")
    print("step  " + "  ".join(f"{c:>16}" for c in COLUMNS))
    last = train[-1]["step"]
    for r in train:
        if r["step"] % every == 0 or r["step"] == last:
            fake, real = r.get("icd_fake_queries") or 0.0, r.get("icd_real_queries") or 0.0
            fake_share = fake / max(1.0, fake + real)
            cells = "  ".join(f"{_fmt(r.get(c)):>16}" for c in COLUMNS)
            print(f"{r['step']:>4}  {cells}   (fake share {fake_share:.3f})")
    for r in records:
        if r["type"] == "eval":
            print(f"eval step {r['step']}: AP {_fmt(r.get('AP'))}  AP50 {_fmt(r.get('AP50'))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--keys", type=int, default=None, help="number of key positions, for ln(keys)")
    args = parser.parse_args()
    if args.keys:
        print(f"uniform attention over {args.keys} keys: entropy ln({args.keys}) = {math.log(args.keys):.3f} nats")
    for folder in args.runs:
        report(folder, max(1, args.every))


if __name__ == "__main__":
    main()
