"""`metrics.jsonl` in every run folder: the training curves a CLI user keeps after the progress bar is gone.

One JSON object per line, as detectron2's metrics.json: `{"step": s, "type": "train", ...scalars}`
every `schedule.log_every` steps (losses, lr, seconds/step, a distiller's diagnostics such as ICD's
identification accuracy and attention entropy) and `{"step": s, "type": "eval", ...AP}` after each
COCO evaluation. A resumed run appends; after resuming from an earlier checkpoint a step can appear
twice, and the later line is the one that counts (`read_metrics_log` keeps it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..json_numbers import finite_or_none
from .callbacks import Callback, EvalResult

FILENAME = "metrics.jsonl"


class MetricsLog(Callback):
    """Append training scalars and evaluations to `<run folder>/metrics.jsonl`."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / FILENAME

    def _append(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self._append({"step": step, "type": "train", **finite_or_none({k: float(v) for k, v in metrics.items()})})

    def on_evaluation(self, result: EvalResult) -> None:
        metrics = finite_or_none({k: float(v) for k, v in result.metrics.items()})
        self._append({"step": result.step, "type": "eval", **metrics})


def read_metrics_log(folder: Path) -> list[dict[str, Any]]:
    """The records of a run folder's metrics.jsonl in step order, the last one kept per (type, step)."""
    path = Path(folder) / FILENAME
    if not path.is_file():
        return []
    latest: dict[tuple[str, int], dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            latest[(record["type"], int(record["step"]))] = record
    return sorted(latest.values(), key=lambda r: (int(r["step"]), r["type"]))
