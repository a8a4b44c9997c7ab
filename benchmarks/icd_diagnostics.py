"""Is ICD's decoder learning? Print its diagnostics from the metrics.jsonl of one or more ICD runs.

    .venv/bin/python benchmarks/icd_diagnostics.py RUN_DIR [RUN_DIR ...] [--every 100] [--keys 336]

Per logged step (every --every steps), measured on that step's batch before its update
(icd_core.distill.icd_diagnostics): the identification AUC of the auxiliary head's real/fake logit
(0.5 = chance), the recall of real queries at logit > 0, the share of a real query's attention inside
its own box next to what uniform attention would put there (and their ratio), the localization error
in box units, the attention entropy of the real queries in nats and the ICD losses, then the run's
COCO evaluations with the same diagnostics on a held-out validation batch. Accuracy at threshold 0
is not shown: it sits at the fake share (5/6 at rho = 5) while the head still calls everything
"fake", whatever the decoder has learned. With --keys the uniform entropy ln(keys) is printed for
comparison (128 px images on P3-P5: 16² + 8² + 4² = 336).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from icd_core.engine.metrics_log import read_metrics_log

COLUMNS = (
    "icd_ident_auc",
    "icd_real_recall",
    "icd_inbox_mass",
    "icd_inbox_uniform",
    "icd_loc_error",
    "icd_attn_entropy",
    "loss_icd_ident",
    "loss_icd_distill",
    "loss",
)
WIDTH = 13
HELDOUT = (
    "icd_heldout_auc",
    "icd_heldout_real_recall",
    "icd_heldout_inbox_mass",
    "icd_heldout_inbox_uniform",
    "icd_heldout_loc_error",
)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def report(folder: Path, every: int) -> None:
    records = read_metrics_log(folder)
    train = [r for r in records if r["type"] == "train" and "icd_attn_entropy" in r]
    if not train:
        print(f"{folder}: no ICD metrics in metrics.jsonl (not an ICD run, or written before metrics.jsonl existed)")
        return
    print(f"\n{folder}")
    print("step  " + "  ".join(f"{c.removeprefix('icd_'):>{WIDTH}}" for c in COLUMNS) + "  in-box/uniform")
    last = train[-1]["step"]
    for r in train:
        if r["step"] % every == 0 or r["step"] == last:
            mass, uniform = r.get("icd_inbox_mass"), r.get("icd_inbox_uniform")
            ratio = mass / uniform if mass is not None and uniform else None
            cells = "  ".join(f"{_fmt(r.get(c)):>{WIDTH}}" for c in COLUMNS)
            print(f"{r['step']:>4}  {cells}  {_fmt(ratio):>14}")
    for r in records:
        if r["type"] == "eval":
            held = "  ".join(f"{k.removeprefix('icd_heldout_')} {_fmt(r.get(k))}" for k in HELDOUT if k in r)
            print(
                f"eval step {r['step']}: AP {_fmt(r.get('AP'))}  AP50 {_fmt(r.get('AP50'))}"
                + (f"  | held-out batch: {held}" if held else "")
            )


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
