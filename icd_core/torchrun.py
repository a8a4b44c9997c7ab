"""The one torchrun command line (no torch import: the worker's parent process builds it too).

`python -m torch.distributed.run --standalone` picks a free local rendezvous port; `--max-restarts 0`
because a rank that fails must fail the attempt (leases and retries live in the job system, not here).
"""

from __future__ import annotations

import sys


def torchrun_argv(nproc: int, module: str, *args: str, monitor_interval_s: float | None = None) -> list[str]:
    """`torchrun --standalone --nproc-per-node N --max-restarts 0 -m MODULE ARGS...` for this interpreter."""
    monitor = ["--monitor-interval", str(monitor_interval_s)] if monitor_interval_s is not None else []
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        "--max-restarts",
        "0",
        *monitor,
        "-m",
        module,
        *args,
    ]
