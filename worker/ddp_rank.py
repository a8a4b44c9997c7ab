"""One rank of a job's torchrun group: `python -m worker.ddp_rank JOB_ID ATTEMPT JOB_DIR` (see worker.group).

Rank 0 reports as the in-process task does (metrics, evaluations, checkpoints, the cancel flag)
through a DbReporter, and stops cooperatively when the parent worker creates the group's stop file
(a worker shutdown). Every rank writes its outcome to `<job_dir>/group/outcome-<rank>.json`, which
the parent maps to the job's state; a rank that dies without one fails the attempt.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

from icd_core.engine.callbacks import Callback, TrainingStopped
from icd_core.engine.distributed import TORCHRUN, die_with_parent
from icd_core.run_layout import SPEC_FILE

log = logging.getLogger("worker.ddp_rank")

GROUP_DIR = "group"
STOP_FILE = "stop"


def outcome_path(group_dir: Path, rank: int) -> Path:
    return group_dir / f"outcome-{rank}.json"


def pid_path(group_dir: Path, rank: int) -> Path:
    return group_dir / f"rank-{rank}.pid"


class StopFile(Callback):
    """should_stop once `path` exists (one stat per step; the parent creates it on shutdown)."""

    def __init__(self, path: Path):
        self.path = path

    def should_stop(self) -> bool:
        return self.path.exists()


def _write_outcome(group_dir: Path, rank: int, outcome: dict[str, Any]) -> None:
    path = outcome_path(group_dir, rank)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(outcome, default=str))
    tmp.replace(path)


def run_rank(job_id: int, attempt: int, job_dir: Path) -> dict[str, Any]:
    """Join the group, run the spec, and say how it ended (never raises for a training failure)."""
    from icd_core.engine.distributed import RankGroup
    from icd_core.json_numbers import finite_floats
    from icd_core.runner import run_spec
    from icd_core.spec import parse_spec
    from store.artifacts import ArtifactStore
    from store.settings import get_settings
    from worker.db import sessions
    from worker.outcome import failure_message
    from worker.reporter import DbReporter
    from worker.run_job import resolve_checkpoint

    group_dir = job_dir / GROUP_DIR
    settings = get_settings()
    spec = parse_spec(json.loads((group_dir / SPEC_FILE).read_text()))
    reporter: DbReporter | None = None
    group = None
    try:
        group = RankGroup.join(spec.device, settings.ddp_timeout_s)
        callbacks: list[Callback] = []
        if group.is_main:
            reporter = DbReporter(sessions(), job_id, attempt, ArtifactStore(settings.artifact_root))
            callbacks = [reporter, StopFile(group_dir / STOP_FILE)]
        try:
            result = run_spec(
                spec,
                job_dir,
                callbacks=callbacks,
                resume=True,
                resolve_checkpoint=resolve_checkpoint,
                cache_dir=settings.cache_dir,
                group=group,
            )
        finally:
            if reporter is not None:
                reporter.close()
        return {
            "status": "succeeded",
            "step": reporter.step if reporter is not None else None,
            "total": reporter.total if reporter is not None else None,
            "final_metrics": finite_floats(result.final_metrics),
            "evaluation": asdict(result.evaluation) if result.evaluation is not None else None,
            "sec_per_step": result.sec_per_step,
            "peak_memory_mb": result.peak_memory_mb,
        }
    except TrainingStopped as exc:
        # Every rank stops at the same voted step; they leave together, after rank 0 has closed its
        # reporter, as they do after a finished run (icd_core.runner): a rank that tears the group down
        # while rank 0 still works can abort rank 0 (gloo), failing a job that only had to be re-queued.
        if group is not None:
            group.barrier()
        return {
            "status": "stopped",
            "step": exc.step,
            "canceled": bool(reporter is not None and reporter.cancel_requested),
        }
    except Exception as exc:  # noqa: BLE001 - every failure becomes an outcome the parent can map
        log.error("rank %s failed:\n%s", os.environ.get("RANK"), "".join(traceback.format_exception(exc)))
        step = reporter.step + 1 if reporter is not None and reporter.step else None
        return {
            "status": "failed",
            "type": type(exc).__name__,
            "error": str(exc) or type(exc).__name__,
            "message": failure_message(job_id, exc, step),
        }
    finally:
        if group is not None:
            group.close()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3:
        print("usage: python -m worker.ddp_rank JOB_ID ATTEMPT JOB_DIR", file=sys.stderr)
        return 2
    die_with_parent(TORCHRUN)
    job_id, attempt, job_dir = int(args[0]), int(args[1]), Path(args[2])
    rank = int(os.environ["RANK"])
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format=f"%(asctime)s %(levelname)s rank {rank} %(name)s: %(message)s"
    )
    group_dir = job_dir / GROUP_DIR
    pid_path(group_dir, rank).write_text(str(os.getpid()))
    outcome = run_rank(job_id, attempt, job_dir)
    _write_outcome(group_dir, rank, outcome)
    return 1 if outcome["status"] == "failed" else 0


if __name__ == "__main__":
    raise SystemExit(main())
