"""Sweep jobs in the service: trials as child jobs, Optuna asked under the sweep's turn, pruning at evaluations.

Modelled on the study (worker/study.py): a sweep never holds a worker while its trials train.
`start_sweep` (the sweep's own task) parks it in 'waiting' and creates the first `parallel` trials.
Each trial's task calls `child_ended` when the trial ends: under the sweep's turn (one process at a
time) that rebuilds the Optuna study from the database, creates trials up to `parallel` until the
budget is used, and once every trial has ended writes report.json / report.md and closes the sweep.
The workers' periodic upkeep (`advance_idle_sweeps`) does the same for a sweep whose last change
happened where no task saw it (a trial reaped, a turn holder killed).

Pruning happens in the worker that runs the trial: `trial_callbacks` gives it a `PruneOnEvaluation`
whose judge reads the sibling trials from the database at each evaluation (docs/sweeps.md#pruning).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from icd_core.spec import SweepSpec, parse_spec
from icd_core.sweep import (
    ENDED,
    PruneDecision,
    PruneOnEvaluation,
    TrialRecord,
    judge,
    suggest,
    sweep_report,
    trial_spec,
    write_sweep_report,
)
from store.artifacts import ArtifactStore
from store.dispatch import queue_for
from store.jobs import JobStateError, fail_job, finish_study, get_job, park_study, request_cancel, update_progress
from store.models import Job, JobStatus
from store.settings import get_settings
from store.sweeps import (
    create_trial,
    end_turn,
    set_system_attrs,
    take_turn,
    trial_of,
    trial_records,
    trial_rows,
)

log = logging.getLogger(__name__)


def _spec(job: Job) -> SweepSpec:
    sweep = parse_spec(job.spec)
    assert isinstance(sweep, SweepSpec)
    return sweep


def start_sweep(s: Session, job: Job) -> list[Job]:
    """Park a claimed sweep job and create its first trials; returns the trials to enqueue.

    A redelivered sweep task finds its trials already there and only parks (the turn tops them up)."""
    sweep = _spec(job)
    park_study(s, job.id, sweep.trials)
    return advance(s, job.id)


def advance(s: Session, sweep_id: int) -> list[Job]:
    """Under the sweep's turn: close it when its budget is used and every trial ended, else create trials
    up to `parallel`. Returns the trials created (to enqueue); [] when another process has the turn."""
    if not take_turn(s, sweep_id):
        return []
    ended = False
    try:
        parent = get_job(s, sweep_id)
        if parent is None or parent.status != "waiting":
            return []
        sweep = _spec(parent)
        trials = trial_records(s, sweep_id, sweep.metric)
        active = [r for r in trials if r.status not in ENDED]
        update_progress(s, sweep_id, len(trials) - len(active), sweep.trials, None)
        if len(trials) >= sweep.trials and not active:
            ended = close_sweep(s, parent, sweep, trials)
            return []
        try:
            return _create_trials(s, parent, sweep, trials, len(active))
        except ValueError as exc:  # a sampled value the base spec refuses: say which, end the sweep
            ended = _fail_sweep(s, sweep_id, f"trial {len(trials)}: {exc}")
            return []
    finally:
        end_turn(s, sweep_id)
        if ended:
            _tell_parent_study(s, sweep_id)


def _tell_parent_study(s: Session, sweep_id: int) -> None:
    """A tuned study's sweep ended: the study counts it (and, after its last sweep, starts its seeds)."""
    from worker.study import child_ended  # the study module imports this one's callers

    job = get_job(s, sweep_id)
    if job is not None and job.parent_id is not None:
        child_ended(s, sweep_id)


def _create_trials(s: Session, parent: Job, sweep: SweepSpec, trials: list[TrialRecord], active: int) -> list[Job]:
    created = []
    while len(trials) < sweep.trials and active < sweep.parallel:
        number = len(trials)
        params = suggest(sweep, trials)
        spec = trial_spec(sweep, number, params)
        child = create_trial(s, parent, number, params, spec.model_dump(mode="json"), queue_for(spec))
        trials.append(TrialRecord(number, params, child.status, job_id=child.id))
        active += 1
        created.append(child)
        _log_to_sweep(parent.id, f"trial {number} is job {child.id}: {_params(params)}")
    return created


def child_ended(s: Session, child_id: int) -> list[Job] | None:
    """After a child job ended: None when it is no sweep's trial (a study's child); else log its end and
    advance its sweep, returning the trials to enqueue."""
    trial = trial_of(s, child_id)
    if trial is None:
        return None
    child = get_job(s, child_id)
    parent = get_job(s, trial.sweep_id)
    if child is None or parent is None or parent.status != "waiting":
        return []
    why = f": {child.error}" if child.status in (JobStatus.PRUNED, JobStatus.FAILED) and child.error else ""
    _log_to_sweep(parent.id, f"trial {trial.number} (job {child_id}) ended {child.status}{why}")
    return advance(s, parent.id)


def close_sweep(s: Session, parent: Job, sweep: SweepSpec, trials: list[TrialRecord]) -> bool:
    """Write the report and end the sweep: succeeded with the best trial, or failed when none finished."""
    report = sweep_report(sweep, trials)
    write_sweep_report(report, ArtifactStore(get_settings().artifact_root).report_dir(parent.id))
    best = report["best"]
    if best is None:
        counts = ", ".join(f"{n} {status}" for status, n in sorted(report["counts"].items()))
        msg = f"no trial finished with a {sweep.metric} ({counts}); see GET /jobs?parent_id={parent.id}"
        return _fail_sweep(s, parent.id, msg)
    final = {
        f"best_{sweep.metric}": best["value"],
        "best_trial": best["number"],
        "best_job_id": best["job_id"],
        "best_params": best["params"],
        "trials": len(trials),
        **{f"trials_{status}": n for status, n in report["counts"].items()},
        "steps_total": report["steps_total"],
    }
    if finish_study(s, parent.id, final) is None:
        return False  # canceled or failed meanwhile: that outcome stands
    _log_to_sweep(
        parent.id,
        f"sweep {parent.id} succeeded: best trial {best['number']} {_params(best['params'])}, "
        f"{sweep.metric} {best['value']:.2f}",
    )
    return True


def _fail_sweep(s: Session, sweep_id: int, problem: str) -> bool:
    for _trial, job in trial_rows(s, sweep_id):
        if job.status not in ENDED:
            try:
                request_cancel(s, job.id)
            except JobStateError:  # it ended meanwhile
                pass
    if fail_job(s, sweep_id, problem) is None:
        return False
    _log_to_sweep(sweep_id, f"sweep {sweep_id} failed: {problem}")
    return True


def advance_idle_sweeps(s: Session) -> list[Job]:
    """Advance every waiting sweep nobody holds (the workers' periodic upkeep); returns trials to enqueue.

    A trial ended where no task advanced its sweep (the reaper failed it at max_attempts, a cancel of a
    job whose worker died, or the turn was held when it ended) would otherwise leave the sweep waiting.
    Advancing a sweep with nothing to do only reads it."""
    ids = list(s.scalars(select(Job.id).where(Job.kind == "sweep", Job.status == JobStatus.WAITING).order_by(Job.id)))
    created: list[Job] = []
    for sweep_id in ids:
        created += advance(s, sweep_id)
    return created


# --- pruning, in the worker that runs a trial ---------------------------------------------------------------
def trial_callbacks(factory: sessionmaker[Session], job_id: int) -> list[PruneOnEvaluation]:
    """[the pruning callback] for a sweep's trial, [] for any other job."""
    with factory() as s:
        trial = trial_of(s, job_id)
        parent = get_job(s, trial.sweep_id) if trial is not None else None
        if trial is None or parent is None:
            return []
        sweep, sweep_id = _spec(parent), parent.id
    if sweep.pruner.kind == "none":
        return []

    def ask(step: int, value: float) -> PruneDecision:
        with factory() as s:
            trials = trial_records(s, sweep_id, sweep.metric)
            me = next(r for r in trials if r.job_id == job_id)
            decision = judge(sweep, trials, me, step, value)
            set_system_attrs(s, job_id, decision.system_attrs)
        return decision

    return [PruneOnEvaluation(ask, sweep.metric)]


def pruned_outcome(callbacks: list[PruneOnEvaluation], exc: BaseException) -> tuple[str, dict[str, Any]] | None:
    """(reason, final metrics) when `exc` is the stop of a trial its pruner decided; None otherwise."""
    from icd_core.engine.callbacks import TrainingStopped

    for cb in callbacks:
        if isinstance(exc, TrainingStopped) and cb.decision is not None:
            at = float(cb.decided_at if cb.decided_at is not None else exc.step)
            return str(cb.decision.reason), {cb.metric: cb.decided_value, "step": float(exc.step), "pruned_at_step": at}
    return None


def _params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _log_to_sweep(sweep_id: int, message: str) -> None:
    """Append to the sweep's own log: its trials end in other tasks, after the sweep's task returned."""
    log.info("%s", message)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    try:
        with open(ArtifactStore(get_settings().artifact_root).log_path(sweep_id), "a", encoding="utf-8") as f:
            f.write(f"{stamp} INFO worker.sweep: {message}\n")
    except OSError as exc:
        log.warning("sweep %s: cannot append to its log: %s", sweep_id, exc)
