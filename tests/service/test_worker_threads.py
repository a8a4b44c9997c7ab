"""Worker thread sizing (worker.threads): the pure sizing rules, the --threads / ICD_WORKER_THREADS
plumbing, and a real `icd worker` process whose torch runs on the count it was given."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import REPO, service_env, stop_process, wait_for
from worker.threads import (
    THREADS_ENV,
    choose_threads,
    default_threads,
    openmp_env,
    rank_threads,
    usable_cores,
)


@pytest.mark.parametrize(
    ("cores", "workers", "api", "expected"),
    [
        (2, 1, True, 1),  # the demo: `icd serve` on 2 cores leaves the API a core
        (2, 1, False, 2),  # `icd worker --cpu` alone on 2 cores
        (16, 1, True, 15),
        (16, 2, False, 8),
        (16, 3, True, 5),  # (16 - 1) // 3
        (8, 3, False, 2),  # 8 // 3, the remainder stays free
        (1, 1, True, 1),  # no more cores than workers: nothing held back for the API
        (2, 2, True, 1),
        (4, 8, False, 1),  # more workers than cores: still one thread each
    ],
)
def test_default_threads(cores: int, workers: int, api: bool, expected: int) -> None:
    assert default_threads(cores, workers, api) == expected


def test_default_threads_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        default_threads(0, 1)
    with pytest.raises(ValueError):
        default_threads(4, 0)


def test_usable_cores_honours_a_cgroup_quota(tmp_path: Path) -> None:
    mask = len(os.sched_getaffinity(0))
    cpu_max = tmp_path / "cpu.max"
    assert usable_cores(cpu_max) == mask  # no file: the affinity mask
    cpu_max.write_text("max 100000\n")
    assert usable_cores(cpu_max) == mask
    cpu_max.write_text("150000 100000\n")  # docker --cpus 1.5: one thread the quota always pays for
    assert usable_cores(cpu_max) == 1
    cpu_max.write_text("50000 100000\n")
    assert usable_cores(cpu_max) == 1
    cpu_max.write_text(f"{(mask + 4) * 100000} 100000\n")  # a quota above the mask: the mask
    assert usable_cores(cpu_max) == mask
    cpu_max.write_text("garbage\n")
    assert usable_cores(cpu_max) == mask


def test_choose_threads_order_requested_then_omp_then_default() -> None:
    assert choose_threads(3, environ={"OMP_NUM_THREADS": "5"}, cores=16).threads == 3
    pinned = choose_threads(None, environ={"OMP_NUM_THREADS": "5"}, cores=16)
    assert (pinned.threads, pinned.reason) == (5, "OMP_NUM_THREADS")
    for unusable in ("", "0", "-2", "four"):
        assert choose_threads(None, environ={"OMP_NUM_THREADS": unusable}, cores=16).threads == 16
    default = choose_threads(None, workers=1, api_beside=True, environ={}, cores=2)
    assert default.threads == 1 and "2 usable core(s)" in default.reason and "API" in default.reason
    assert choose_threads(None, workers=2, environ={}, cores=16).threads == 8
    with pytest.raises(ValueError):
        choose_threads(0)


def test_ranks_share_the_worker_threads() -> None:
    assert [rank_threads(8, r) for r in (1, 2, 3, 16)] == [8, 4, 2, 1]
    assert openmp_env(3) == {"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3"}


def test_setting_reads_icd_worker_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from store.settings import Settings

    monkeypatch.delenv(THREADS_ENV, raising=False)
    assert Settings().worker_threads is None
    monkeypatch.setenv(THREADS_ENV, "3")
    assert Settings().worker_threads == 3
    monkeypatch.setenv(THREADS_ENV, "0")
    with pytest.raises(ValidationError):
        Settings()


def test_worker_spec_hands_its_thread_count_to_the_process() -> None:
    from worker.supervisor import WorkerSpec

    spec = WorkerSpec("cpu@host", "cpu,any", {"CUDA_VISIBLE_DEVICES": ""})
    base = {THREADS_ENV: "7", "PATH": "/bin"}
    assert spec.process_env(base)[THREADS_ENV] == "7"  # no count chosen: the environment's stands
    spec.threads = 2
    env = spec.process_env(base)
    assert env[THREADS_ENV] == "2" and env["CUDA_VISIBLE_DEVICES"] == "" and env["PATH"] == "/bin"
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(REPO)


def test_serve_sizes_its_local_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """`icd serve`'s worker: --threads, else ICD_WORKER_THREADS, else the default with the API beside.
    Only the process start is replaced; the choice and the spec are the real ones."""
    from icd_cli import service
    from store.settings import Settings
    from worker.supervisor import WorkerProcess

    started: list[Any] = []
    monkeypatch.setattr(WorkerProcess, "start", lambda self: started.append(self.spec))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv(THREADS_ENV, raising=False)
    service._start_local_worker(Settings(), threads=None)
    service._start_local_worker(Settings(worker_threads=3), threads=None)
    service._start_local_worker(Settings(worker_threads=3), threads=2)
    expected_default = default_threads(usable_cores(), 1, api_beside=True)
    assert [s.threads for s in started] == [expected_default, 3, 2]


def _threads_logged(log_path: Path) -> int | None:
    found = re.search(r"torch intra-op threads (\d+)", log_path.read_text(errors="replace"))
    return int(found.group(1)) if found else None


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_icd_worker_process_runs_torch_on_the_threads_given(tmp_path: Path) -> None:
    """A real `icd worker --cpu --threads N` (embedded SQLite broker): its worker process reports
    torch.get_num_threads() == N. N is one more than the usable cores, a count neither torch's default
    nor ours would pick, so a worker ignoring the flag cannot pass."""
    from store.db import upgrade_database

    wanted = usable_cores() + 1
    env = {k: v for k, v in service_env(tmp_path).items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    upgrade_database(f"sqlite:///{tmp_path / 'home' / 'icd.db'}")
    log_path = tmp_path / "worker.log"
    icd = [sys.executable, "-c", "from icd_cli.main import main; main()"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [*icd, "worker", "--cpu", "--threads", str(wanted), "--stop-grace", "10"],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: _threads_logged(log_path) or proc.poll() is not None, 120, "the worker's thread count")
        text = log_path.read_text(errors="replace")
        assert _threads_logged(log_path) == wanted, text[-3000:]
        assert f"{wanted} torch thread(s) per worker (--threads or ICD_WORKER_THREADS)" in text
    finally:
        code = stop_process(proc, timeout=60)
    assert code == 0, log_path.read_text(errors="replace")[-3000:]
