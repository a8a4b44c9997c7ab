"""Suite-wide rules: under CI=true a test that needs PostgreSQL or Redis must run, never skip. Also the
malicious-checkpoint writer shared by the core and service safe-loading tests."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
SERVICES = {"postgres": ("127.0.0.1", 5432), "redis": ("127.0.0.1", 6379)}
_skipped_service_tests: list[str] = []


def service_reachable(name: str, timeout: float = 1.0) -> bool:
    host, port = SERVICES[name]
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def require_service(name: str) -> None:
    """Skip when a service is down on a laptop; fail under CI=true, where it must be up."""
    if service_reachable(name):
        return
    host, port = SERVICES[name]
    msg = f"{name} is unreachable at {host}:{port}"
    if IN_CI:
        pytest.fail(f"{msg} (CI=true: service tests must run, not skip)")
    pytest.skip(msg)


def pytest_sessionstart(session: pytest.Session) -> None:
    if IN_CI:
        down = [n for n in SERVICES if not service_reachable(n)]
        if down:
            pytest.exit(f"CI=true but required services are unreachable: {', '.join(down)}", returncode=1)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # Only skips for an unreachable service count: a test of a service module may skip for its own reason
    # (e.g. the screenshot writer without ICD_JOB_PAGE_SHOTS).
    unreachable = "is unreachable" in str(report.longrepr)
    if report.skipped and unreachable and any(m in report.keywords for m in SERVICES):
        _skipped_service_tests.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if IN_CI and _skipped_service_tests:
        print(f"\nCI=true: {len(_skipped_service_tests)} PostgreSQL/Redis test(s) were skipped:")
        for nodeid in _skipped_service_tests:
            print(f"  {nodeid}")
        session.exitstatus = 1


class _RunsCode:
    """Unpickling this runs `touch marker`, as an attacker's os.system call would."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def _write_malicious_checkpoint(path: Path, marker: Path, raw_pickle: bool = False) -> Path:
    """A checkpoint-looking file whose unpickling creates `marker` unless loading is weights-only."""
    import pickle

    import torch

    payload = {"model": _RunsCode(marker), "model_spec": {}}
    if raw_pickle:
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path)
    return path


@pytest.fixture
def malicious_checkpoint() -> Any:
    """write(path, marker, raw_pickle=False) -> path: a malicious pickle for the safe-loading tests."""
    return _write_malicious_checkpoint
