"""Run a resources.gpus > 1 job as a torchrun group from the worker, and map its exit to an outcome.

The worker process stays the job's owner: it keeps beating (heartbeat, lease) while the group runs,
turns a worker shutdown into the group's stop file (rank 0 checkpoints and the ranks stop together),
and reads the ranks' outcome files when torchrun exits. torchrun runs with --max-restarts 0: a rank
that fails or is killed makes torchrun stop the others and exit non-zero, which fails this attempt.
No process of the group outlives it: torchrun and every rank die with their parent (PR_SET_PDEATHSIG),
and a final sweep kills any rank still alive by its pid file.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from icd_core.engine.callbacks import EvalResult, TrainingStopped
from icd_core.engine.distributed import die_with_parent
from icd_core.run_layout import LOG_FILE
from icd_core.torchrun import torchrun_argv
from worker.ddp_rank import GROUP_DIR, SPEC_FILE, STOP_FILE, outcome_path, pid_path
from worker.threads import openmp_env, rank_threads

log = logging.getLogger(__name__)

POLL_S = 0.5
KILL_WAIT_S = 10.0
# Exceptions a rank may report that keep their meaning (and the user-facing message) in the parent.
_USER_ERRORS: dict[str, type[Exception]] = {
    "ValueError": ValueError,
    "FileNotFoundError": FileNotFoundError,
    "NotImplementedError": NotImplementedError,
}


@dataclass
class GroupResult:
    """What `worker.tasks` needs from a finished run (the fields of icd_core.runner.RunResult)."""

    final_metrics: dict[str, float]
    evaluation: EvalResult | None
    final_checkpoint: Path | None
    sec_per_step: float | None
    peak_memory_mb: float | None


def torchrun_command(gpus: int, job_id: int, attempt: int, job_dir: Path) -> list[str]:
    """`torchrun --standalone --nproc-per-node N` (a free local port) running worker.ddp_rank."""
    return torchrun_argv(gpus, "worker.ddp_rank", str(job_id), str(attempt), str(job_dir), monitor_interval_s=0.5)


def rank_env(ranks: int) -> dict[str, str]:
    """The ranks' environment: this worker's own torch threads split among them (torchrun would give
    each rank 1 only when OMP_NUM_THREADS is unset, and the worker sets it to its whole count)."""
    import torch

    return {**os.environ, **openmp_env(rank_threads(torch.get_num_threads(), ranks))}


def run_group(
    job_id: int,
    attempt: int,
    spec: dict[str, Any],
    gpus: int,
    job_dir: Path,
    should_stop: Callable[[], bool],
    on_tick: Callable[[], None] | None = None,
    stop_grace_s: float = 120.0,
) -> tuple[GroupResult, dict[str, Any]]:
    """Run the group to its end; returns the result and rank 0's outcome (step, total).

    Raises TrainingStopped (rank 0 stopped cooperatively: canceled or shut down), the rank's own
    ValueError/FileNotFoundError, or RuntimeError naming the rank that failed or died.
    """
    group_dir = job_dir / GROUP_DIR
    shutil.rmtree(group_dir, ignore_errors=True)  # a previous attempt's outcomes and stop file
    group_dir.mkdir(parents=True)
    (group_dir / SPEC_FILE).write_text(json.dumps(spec))
    log_path = job_dir / LOG_FILE
    log.info("job %s: starting a %d-rank torchrun group", job_id, gpus)
    with open(log_path, "ab") as job_log:  # the ranks' log lines join the job's log
        proc = subprocess.Popen(
            torchrun_command(gpus, job_id, attempt, job_dir),
            env=rank_env(gpus),
            stdout=job_log,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )  # noqa: PLW1509
    try:
        _supervise(proc, group_dir / STOP_FILE, should_stop, on_tick, stop_grace_s)
    finally:
        _end_group(proc, group_dir, gpus)
    return read_outcome(group_dir, gpus, proc.returncode, log_path)


def _supervise(
    proc: subprocess.Popen[bytes],
    stop_file: Path,
    should_stop: Callable[[], bool],
    on_tick: Callable[[], None] | None,
    stop_grace_s: float,
) -> None:
    """Wait for torchrun, beating and relaying a stop request; kill a group that ignores one."""
    stop_since: float | None = None
    while proc.poll() is None:
        if on_tick is not None:
            on_tick()
        if stop_since is None and should_stop():
            stop_file.touch()
            stop_since = time.monotonic()
            log.info("asked the group to stop (checkpoint, then exit)")
        elif stop_since is not None and time.monotonic() - stop_since > stop_grace_s:
            log.error("the group did not stop within %.0f s of the request: killing it", stop_grace_s)
            return
        time.sleep(POLL_S)


def _end_group(proc: subprocess.Popen[bytes], group_dir: Path, gpus: int) -> None:
    """torchrun gets SIGTERM (it stops its ranks), then SIGKILL; then every rank still alive is killed."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=KILL_WAIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for rank in range(gpus):
        pid = _rank_pid(group_dir, rank)
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
                log.warning("killed rank %d (pid %d), still alive after its group ended", rank, pid)
            except ProcessLookupError:
                pass


def _rank_pid(group_dir: Path, rank: int) -> int | None:
    """The pid of a live rank process of this group (checked by its command line: pids are reused)."""
    try:
        pid = int(pid_path(group_dir, rank).read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"worker.ddp_rank" in cmdline and str(group_dir.parent).encode() in cmdline else None


def read_outcome(
    group_dir: Path, gpus: int, returncode: int | None, log_path: Path
) -> tuple[GroupResult, dict[str, Any]]:
    """Map the ranks' outcome files and torchrun's exit code to a result or an exception."""
    outcomes = {r: json.loads(p.read_text()) for r in range(gpus) if (p := outcome_path(group_dir, r)).is_file()}
    main = outcomes.get(0, {})
    if returncode == 0 and main.get("status") == "succeeded":
        ev = main.get("evaluation")
        result = GroupResult(
            main["final_metrics"],
            EvalResult(**ev) if ev else None,
            None,
            main.get("sec_per_step"),
            main.get("peak_memory_mb"),
        )
        return result, main
    if returncode == 0 and main.get("status") == "stopped":
        stop = TrainingStopped(int(main["step"]))
        stop.canceled = bool(main.get("canceled"))  # type: ignore[attr-defined]
        raise stop
    failed = {r: o for r, o in sorted(outcomes.items()) if o.get("status") == "failed"}
    cause = _root_cause(log_path)
    culprit = cause.get("rank", next(iter(failed), None))
    if culprit in failed:  # the first rank to fail reported why
        first = failed[culprit]
        cls = _USER_ERRORS.get(first["type"])
        if cls is not None:
            raise cls(first["error"])
        raise RuntimeError(f"rank {culprit} of {gpus} failed: {first['type']}: {first['error'][:500]}")
    how = cause.get("traceback") or f"exit code {cause.get('exitcode', returncode)}"
    who = f"rank {culprit} of {gpus}" if culprit is not None else f"a rank of the {gpus}-rank group"
    raise RuntimeError(
        f"{who} died before reporting ({how}); torchrun stopped the group (exit code "
        f"{returncode}); retry to resume from the last checkpoint"
    )


def _root_cause(log_path: Path) -> dict[str, Any]:
    """torchrun's 'Root Cause' summary (the first failed rank, its exit code, the signal) from the
    end of the job log: {rank: int, exitcode: str, traceback: str}, each only when printed."""
    try:
        tail = log_path.read_bytes()[-20000:].decode("utf-8", "replace")
    except OSError:
        return {}
    tail = tail[tail.rfind("Root Cause") :] if "Root Cause" in tail else ""
    cause: dict[str, Any] = {}
    for key in ("rank", "exitcode", "traceback"):
        found = re.search(rf"^\s*{key}\s*:\s*(.+)$", tail, flags=re.MULTILINE)
        if found:
            cause[key] = found.group(1).strip()
    if "rank" in cause:
        digits = re.match(r"\d+", cause["rank"])
        cause["rank"] = int(digits.group()) if digits else None
    return cause
