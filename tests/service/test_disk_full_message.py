"""The worker's job.error for a full artifact disk says so, whether the checkpoint writer recognised it
or another write (a log, a metrics file) hit ENOSPC. The disk is simulated, never filled."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Any

import pytest

from icd_core.engine import checkpoint as ckpt
from tests.service.test_worker_task import sessions  # noqa: F401  (fixture: ICD_* in tmp_path)


def test_a_checkpoint_on_a_full_disk_fails_the_job_with_that_message(tmp_path: Path) -> None:
    from worker.outcome import failure_message

    exc = ckpt.DiskFull(ckpt.disk_full_message(tmp_path, "final.pt"))
    text = failure_message(7, exc, step=100)
    assert text.startswith("the artifact disk is full: writing final.pt into ") and text.endswith("(DiskFull)")


def test_any_enospc_write_fails_the_job_as_a_full_disk(sessions: Any, tmp_path: Path) -> None:  # noqa: F811
    from worker.outcome import failure_message

    log = tmp_path / "home" / "artifacts" / "jobs" / "7" / "metrics.jsonl"
    text = failure_message(7, OSError(errno.ENOSPC, "No space left on device", str(log)))
    assert text.startswith(f"the artifact disk is full: writing metrics.jsonl into {log.parent} failed (")
    assert "free of" in text and "OSError: [Errno 28] No space left on device" in text


def test_torch_write_error_on_a_nearly_empty_disk_is_a_full_disk(
    sessions: Any,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from worker.outcome import failure_message

    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda _p: shutil._ntuple_diskusage(2**30, 2**30, 0))  # type: ignore[attr-defined]
    text = failure_message(7, RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"))
    assert text.startswith("the artifact disk is full: writing a file into ") and "0 B free of 1.0 GiB" in text
