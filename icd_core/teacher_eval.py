"""The teacher's AP on the validation set, evaluated once per (teacher file, validation data, test size).

Every distill job (study children included) and every study measures its teacher before training, so a
teacher that did not load, or learned nothing, is caught before a step is spent (the most frequent
"distillation did nothing" cause). The result is cached in `<cache>/teacher_evals/`, beside the ICD
decoder artifacts (`icd_core.pretrain`), keyed by the teacher file's sha256, a fingerprint of the
validation data (its annotation file's sha256 and each image file's name, size and mtime) and the test
sizes, so the children of a study and every later job of the same teacher read it instead.

The evaluation itself is the study's: `icd_core.study.evaluate_checkpoint`, the runner's own evaluate job.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .atomic_files import write_text_atomic
from .hashing import sha256_file
from .leaderboard import AP_METRICS, TEACHER_PREFIX
from .run_layout import SUMMARY_FILE
from .spec import DataSpec, ModelSpec
from .study_plan import preflight

log = logging.getLogger(__name__)

CACHE_FOLDER = "teacher_evals"
CACHE_FORMAT = 1


@dataclass
class TeacherEval:
    """One evaluation of a teacher file on data.val, fresh or read from the cache (`reused`)."""

    metrics: dict[str, float]
    per_class: dict[str, float]
    key: str
    cache_file: str
    checkpoint: str
    device: str | None
    evaluated_at: str
    reused: bool = False

    def flat(self) -> dict[str, float]:
        """teacher_AP, teacher_AP50, ... for a run's final metrics (next to the student's AP, AP50, ...)."""
        return {TEACHER_PREFIX + k: float(self.metrics[k]) for k in AP_METRICS if k in self.metrics}

    def summary(self) -> dict[str, Any]:
        """The record a run's summary.json keeps under `teacher_eval`."""
        return asdict(self)


def validation_fingerprint(data: DataSpec, cache_dir: Path) -> str:
    """sha256 of the validation set as files: the annotation file's content and every image file's
    relative name, size and mtime (hashing every image's bytes would read the whole set per job)."""
    from .data import resolve_source  # opens or generates the data: torch-heavy

    images, annotations = resolve_source(data.val, cache_dir)
    h = hashlib.sha256(sha256_file(annotations).encode())
    for f in sorted(p for p in Path(images).rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"\n{f.relative_to(images)}\t{st.st_size}\t{st.st_mtime_ns}".encode())
    return h.hexdigest()


def cache_key(teacher_sha256: str, val_fingerprint: str, data: DataSpec) -> str:
    blob = {
        "format": CACHE_FORMAT,
        "teacher": teacher_sha256,
        "val": val_fingerprint,
        "test_size": data.test_size,
        "max_size": data.max_size,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def cache_path(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / CACHE_FOLDER / f"{key[:24]}.json"


def _cached(path: Path, key: str) -> TeacherEval | None:
    """The cached evaluation under `key`, or None (absent, unreadable or another key's)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("key") != key:
        return None
    record.pop("reused", None)
    try:
        return TeacherEval(**record, reused=True)
    except TypeError:  # a record of another layout: evaluate again
        return None


def evaluate_teacher(
    path: str | Path,
    data: DataSpec,
    cache_dir: str | Path,
    model: ModelSpec | None = None,
    device: str = "auto",
    batch_size: int = 4,
) -> TeacherEval:
    """The teacher's COCO AP on data.val, from the cache when this file was evaluated on these data and
    sizes before; both cases are logged (the job's log says which)."""
    cache_dir = Path(cache_dir)
    key = cache_key(sha256_file(path), validation_fingerprint(data, cache_dir), data)
    where = cache_path(cache_dir, key)
    found = _cached(where, key)
    if found is not None:
        log.info(
            "teacher %s: AP %.2f (AP50 %.2f) on data.val, reused from the teacher-evaluation cache %s "
            "(evaluated %s on %s)",
            path,
            found.metrics.get("AP", float("nan")),
            found.metrics.get("AP50", float("nan")),
            where,
            found.evaluated_at,
            found.device,
        )
        return found
    from .study import evaluate_checkpoint  # the study's evaluation path (the runner's evaluate job)

    log.info("teacher %s: evaluating on data.val once (cache key %s)", path, key[:24])
    with tempfile.TemporaryDirectory(prefix="icd-teacher-eval-") as tmp:
        evaluation = evaluate_checkpoint(path, data, cache_dir, model, tmp, device=device, batch_size=batch_size)
        summary = json.loads((Path(tmp) / SUMMARY_FILE).read_text())
    result = TeacherEval(
        metrics={k: float(v) for k, v in evaluation.metrics.items()},
        per_class={k: float(v) for k, v in evaluation.per_class.items()},
        key=key,
        cache_file=str(where),
        checkpoint=str(path),
        device=summary.get("device"),
        evaluated_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    write_text_atomic(where, json.dumps(result.summary(), indent=2))
    log.info(
        "teacher %s: AP %.2f (AP50 %.2f) on data.val; cached in %s",
        path,
        result.metrics.get("AP", float("nan")),
        result.metrics.get("AP50", float("nan")),
        where,
    )
    return result


def check_teacher_min_ap(result: TeacherEval, min_ap: float | None) -> None:
    """A teacher below `teacher_min_ap` fails the job before training (the study's pre-flight rule)."""
    if min_ap is not None:
        preflight(result.metrics, None, min_ap)
