"""More than one API process: periodic work runs in exactly one of them, and moves when that one dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from store.db import upgrade_database
from store.leader import LeaderLock, leader_lock
from tests.service.conftest import _truncate

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the API process exited with {proc.returncode}"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/version", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("the API did not start")


def _ticks(path: Path) -> list[int]:
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def _wait_ticks(path: Path, n: int, timeout: float = 30) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(_ticks(path)) < n and time.monotonic() < deadline:
        time.sleep(0.1)
    return _ticks(path)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def shared_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """One migrated database the API processes share."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'icd.db'}"
        upgrade_database(url)
        yield url
    else:
        url = request.getfixturevalue("pg_url")
        _truncate(url)
        yield url


def test_periodic_task_runs_in_one_of_two_api_processes(shared_url: str, tmp_path: Path) -> None:
    ticks = tmp_path / "ticks"
    env = {
        **os.environ,
        "ICD_DATABASE_URL": shared_url,
        "ICD_HOME": str(tmp_path / "home"),
        "ICD_TEST_TICKS": str(ticks),
        "ICD_TEST_TICK_S": "0.1",
        "PYTHONPATH": str(ROOT),
    }
    procs = []
    try:
        for _ in range(2):
            port = _free_port()
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "tests.service.periodic_app:make",
                    "--factory",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--log-level",
                    "warning",
                ],
                cwd=ROOT,
                env=env,
            )
            procs.append(proc)
            _wait_http(port, proc)
        time.sleep(1.5)  # both processes are up and ticking for a while
        first = _wait_ticks(ticks, 10)
        assert len(first) >= 10 and len(set(first)) == 1, f"ticks came from {set(first)}"
        leader = first[0]
        assert leader in {p.pid for p in procs}
        survivor = next(p for p in procs if p.pid != leader)

        os.kill(leader, signal.SIGKILL)  # the leader dies without releasing anything
        n = len(first)
        after = _wait_ticks(ticks, n + 10)[n:]
        assert after and set(after) == {survivor.pid}, f"after the kill ticks came from {set(after)}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(timeout=20)


def test_leader_lock_is_exclusive_and_released(shared_url: str) -> None:
    from store.db import make_engine

    a, b = make_engine(shared_url), make_engine(shared_url)
    try:
        first = LeaderLock(a, "t")
        assert first.try_acquire() and first.held
        with leader_lock(b, "t") as other:
            assert other is False  # flock/advisory locks are per open file/session, so this is a real race
        first.release()
        with leader_lock(b, "t") as other:
            assert other is True
        assert LeaderLock(a, "t").try_acquire()
    finally:
        a.dispose()
        b.dispose()


def test_serve_with_two_api_processes(tmp_path: Path) -> None:
    port = _free_port()
    env = {**os.environ, "ICD_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT)}
    env.pop("ICD_DATABASE_URL", None)
    icd = Path(sys.executable).with_name("icd")
    proc = subprocess.Popen(
        [str(icd), "serve", "--no-worker", "--workers", "2", "--port", str(port), "--log-level", "warning"],
        cwd=tmp_path,
        env={**env, "ICD_AUTO_MIGRATE": "1"},
    )
    try:
        _wait_http(port, proc)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
            for _ in range(20):
                r = c.get("/jobs", params={"limit": 5})
                assert r.status_code == 200 and r.json()["total"] == 0
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
