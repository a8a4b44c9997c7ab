"""What a run produces: metric series, COCO evaluations and checkpoints.

Writes are upserts keyed by (job, name, step) / (job, step) / (job, name): a run resumed from a
checkpoint rewrites the same keys and the database converges to one value per key.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from store.downsample import downsample
from store.models import Attempt, Checkpoint, Evaluation, Job, Metric, utcnow
from store.rollups import refresh_after_delete, update_rollups
from store.upsert import dialect_insert, upsert_rows

EVAL_FIELDS = ("ap", "ap50", "ap75", "aps", "apm", "apl")


def record_lineage(s: Session, job_id: int, attempt: int, lineage: dict[str, Any]) -> bool:
    """Keep what this attempt runs on (icd_core.lineage) on the job; False when another attempt holds it."""
    res = s.execute(
        update(Job)
        .where(Job.id == job_id, Job.attempt == attempt)
        .values(lineage=lineage)
        .execution_options(synchronize_session=False)
    )
    s.commit()
    return res.rowcount == 1  # type: ignore[attr-defined]


def add_metrics(s: Session, job_id: int, attempt: int, rows: Sequence[tuple[str, int, float]]) -> None:
    """Upsert a batch of (name, step, value) scalars in one statement, refresh the rollup blocks they touch,
    and commit once."""
    if not rows:
        return
    params = [
        {"job_id": job_id, "name": n, "step": int(st), "attempt": attempt, "value": float(v)} for n, st, v in rows
    ]
    upsert_rows(s, Metric.__table__, params, keys=("job_id", "name", "step"))
    update_rollups(s, job_id, [(p["name"], p["step"], p["value"]) for p in params])
    s.commit()


def get_metrics(
    s: Session,
    job_id: int,
    names: Sequence[str] | None = None,
    since_step: int | None = None,
    max_points: int | None = None,
) -> dict[str, list[tuple[int, float]]]:
    """Series by name, steps ascending; only steps > since_step (incremental polling).

    With max_points the database downsamples each series (store.downsample): every bucket's min and max
    point and the series' last point, at most max_points points, without reading the series into Python.
    """
    if max_points:
        return downsample(s, job_id, names, since_step, max_points)
    conds: list[Any] = [Metric.job_id == job_id]
    if names:
        conds.append(Metric.name.in_(list(names)))
    if since_step is not None:
        conds.append(Metric.step > since_step)
    q = select(Metric.name, Metric.step, Metric.value).where(*conds).order_by(Metric.name, Metric.step)
    out: dict[str, list[tuple[int, float]]] = {}
    for name, step, value in s.execute(q):
        out.setdefault(name, []).append((step, value))
    return out


def add_evaluation(
    s: Session, job_id: int, attempt: int, step: int, metrics: dict[str, float], per_class: dict[str, float]
) -> None:
    """Upsert one COCO evaluation; metric keys are matched case-insensitively (AP, AP50, ..., APl)."""
    lower = {k.lower(): v for k, v in metrics.items()}
    values: dict[str, Any] = {f: (float(lower[f]) if lower.get(f) is not None else None) for f in EVAL_FIELDS}
    values.update(job_id=job_id, attempt=attempt, step=step, per_class=dict(per_class or {}), created_at=utcnow())
    ins = dialect_insert(s, Evaluation).values(**values)
    update_cols = {k: v for k, v in values.items() if k not in ("job_id", "step")}
    s.execute(ins.on_conflict_do_update(index_elements=[Evaluation.job_id, Evaluation.step], set_=update_cols))
    s.commit()


def list_evaluations(s: Session, job_id: int) -> list[Evaluation]:
    """Every evaluation of a job, by step."""
    return list(s.scalars(select(Evaluation).where(Evaluation.job_id == job_id).order_by(Evaluation.step)))


def add_checkpoint(
    s: Session,
    job_id: int,
    attempt: int,
    step: int,
    name: str,
    path: str | Path,
    size_bytes: int,
    sha256: str,
    final: bool,
) -> None:
    """Upsert a checkpoint record (path relative to the artifact root)."""
    values: dict[str, Any] = dict(
        job_id=job_id,
        attempt=attempt,
        step=step,
        name=name,
        path=str(path),
        size_bytes=int(size_bytes),
        sha256=sha256,
        final=bool(final),
        created_at=utcnow(),
    )
    ins = dialect_insert(s, Checkpoint).values(**values)
    update_cols = {k: v for k, v in values.items() if k not in ("job_id", "name")}
    s.execute(ins.on_conflict_do_update(index_elements=[Checkpoint.job_id, Checkpoint.name], set_=update_cols))
    s.commit()


def list_checkpoints(s: Session, job_id: int) -> list[Checkpoint]:
    """A job's checkpoints, by step."""
    return list(
        s.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step, Checkpoint.name))
    )


def get_checkpoint(s: Session, job_id: int, name: str) -> Checkpoint | None:
    return s.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.name == name)).first()


def final_checkpoint_path(s: Session, artifact_root: str | Path, job_id: int) -> Path | None:
    """Absolute path of the job's final checkpoint (what `checkpoint: job:<id>` resolves to)."""
    ck = s.scalars(
        select(Checkpoint)
        .where(Checkpoint.job_id == job_id, Checkpoint.final.is_(True))
        .order_by(Checkpoint.step.desc())
    ).first()
    if ck is None:
        return None
    return Path(artifact_root) / ck.path


def start_attempt_series(s: Session, job_id: int, attempt: int, resumed_from_step: int) -> None:
    """A new attempt resumes at `resumed_from_step`: earlier attempts' metric points and evaluations
    above that step are superseded (the new attempt recomputes them), so they are dropped now rather
    than left mixed with the new ones. The attempt records its resume step, so a `since_step` poller
    that sees the attempt change knows to refetch from there."""
    for table in (Metric, Evaluation):
        s.execute(delete(table).where(table.job_id == job_id, table.step > resumed_from_step, table.attempt < attempt))
    refresh_after_delete(s, job_id, resumed_from_step)  # the downsampled curves must not keep the dropped points
    s.execute(
        update(Attempt)
        .where(Attempt.job_id == job_id, Attempt.number == attempt)
        .values(resumed_from_step=resumed_from_step)
        .execution_options(synchronize_session=False)
    )
    s.commit()


def forget_missing_checkpoints(s: Session, job_id: int, artifact_root: str | Path) -> list[str]:
    """Drop the rows of checkpoints whose files are gone (pruned by the trainer); returns their names."""
    gone = [c for c in list_checkpoints(s, job_id) if not (Path(artifact_root) / c.path).is_file()]
    for c in gone:
        s.delete(c)
    s.commit()
    return [c.name for c in gone]
