"""How many torch intra-op threads a worker process runs: sized to the cores it can actually have.

torch's default is one thread per core of the machine, as if the worker were alone on it. It rarely
is: the supervisor may start several workers, `icd serve` runs the API beside its worker, and other
programs run too. An intra-op parallel region ends when its slowest thread does, so one thread that
waits for a core held by someone else stalls the whole step. Measured on 2 cores with one busy process
beside (issue #23, item 16): a MobileNetV2 step took 0.26-0.30 s at 1 thread and 1.3-1.6 s at 2. One
thread fewer than the cores costs little on a quiet machine; one thread more than the free cores
costs several times the step.

The supervisor (which knows how many workers it starts and whether the API runs beside them) picks
the count and hands it to each worker as ICD_WORKER_THREADS; the worker applies it at start and sets
OMP_NUM_THREADS / MKL_NUM_THREADS for what it starts (a torchrun group's ranks split it, see
`rank_threads`). DataLoader worker processes need nothing: torch runs each of them on one thread.
Nothing here imports torch at module level: the supervisor's process never loads it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

THREADS_ENV = "ICD_WORKER_THREADS"
# Read by OpenMP/MKL when a child process (a torchrun rank) starts; torch's default follows OMP_NUM_THREADS.
OPENMP_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def usable_cores(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """CPUs this process may run on: its affinity mask (taskset, cpusets), capped by a cgroup v2 CPU
    quota (`docker --cpus`). A fractional quota rounds down (at least 1): a thread the quota cannot
    pay for is throttled each period, which stalls the step like a thread without a core."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux (macOS): no affinity mask
        cores = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(quota) // int(period)))
    except (OSError, ValueError):  # no cgroup v2 (or no quota file): the mask is all we know
        pass
    return max(1, cores)


def default_threads(cores: int, workers: int = 1, api_beside: bool = False) -> int:
    """Threads for each of `workers` worker processes sharing `cores`.

    An equal share of the cores, after one core is left to the API when it runs beside the workers
    (`icd serve`'s embedded mode) and there are more cores than workers. The API is idle most of the
    time, but when it answers (job polling, metric pages, its reaper) it needs a core at once, and a
    worker thread on that core would stall every step for as long. With no more cores than workers,
    holding one back would leave a worker with none, so the API shares. Never fewer than 1.
    Examples: 2 cores, 1 worker, API: 1. 16 cores, 1 worker, API: 15. 16 cores, 2 workers: 8.
    """
    if cores < 1 or workers < 1:
        raise ValueError(f"cores and workers must be >= 1 (got {cores}, {workers})")
    spare = cores - 1 if api_beside and cores > workers else cores
    return max(1, spare // workers)


@dataclass(frozen=True)
class ThreadChoice:
    """A thread count and where it came from (logged at worker start)."""

    threads: int
    reason: str


def _positive_int(value: str | None) -> int | None:
    try:
        n = int(value) if value is not None else 0
    except ValueError:
        return None
    return n if n >= 1 else None


def choose_threads(
    requested: int | None,
    workers: int = 1,
    api_beside: bool = False,
    environ: Mapping[str, str] | None = None,
    cores: int | None = None,
    requested_by: str = "--threads or ICD_WORKER_THREADS",
) -> ThreadChoice:
    """The worker thread count: `requested` (--threads, else ICD_WORKER_THREADS) first; then an
    OMP_NUM_THREADS already set (an operator's or a test harness's existing pin keeps working); then
    `default_threads` over `cores` (default: `usable_cores()`)."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"worker threads must be >= 1 (got {requested})")
        return ThreadChoice(requested, requested_by)
    env = os.environ if environ is None else environ
    pinned = _positive_int(env.get("OMP_NUM_THREADS"))
    if pinned is not None:
        return ThreadChoice(pinned, "OMP_NUM_THREADS")
    cores = usable_cores() if cores is None else cores
    n = default_threads(cores, workers, api_beside)
    beside = ", the API beside" if api_beside else ""
    return ThreadChoice(n, f"default: {cores} usable core(s), {workers} worker(s){beside}")


def openmp_env(threads: int) -> dict[str, str]:
    """The environment entries that give a child process `threads` OpenMP/MKL threads."""
    return dict.fromkeys(OPENMP_ENV, str(threads))


def rank_threads(worker_threads: int, ranks: int) -> int:
    """Threads for each rank of a group the worker starts: its own share split among the ranks."""
    return max(1, worker_threads // max(1, ranks))


def apply_threads(threads: int) -> int:
    """Run this process's torch ops on `threads` intra-op threads and pass the same count to the
    processes it starts. Returns torch's own count afterwards (what the log should report)."""
    import torch

    torch.set_num_threads(threads)
    os.environ.update(openmp_env(threads))
    return torch.get_num_threads()
