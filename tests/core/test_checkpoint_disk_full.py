"""A checkpoint write that fails on a full disk says so, with the free space, the folder and what to do;
torch's own error ("unexpected pos ...") names none of them. The disk is simulated, never filled."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from icd_core.engine import checkpoint as ckpt

TORCH_FULL = "[enforce fail at inline_container.cc:672] . unexpected pos 4160 vs 4054"


def _usage(free: int) -> Any:
    return lambda _folder: shutil._ntuple_diskusage(10 * 2**30, 10 * 2**30 - free, free)  # type: ignore[attr-defined]


def _failing_save(exc: BaseException) -> Any:
    def save(obj: Any, f: Any) -> None:
        f.write(b"partial")  # what a real write leaves before the disk runs out
        raise exc

    return save


def test_torch_write_error_on_a_full_disk_says_the_disk_is_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ckpt.torch, "save", _failing_save(RuntimeError(TORCH_FULL)))
    monkeypatch.setattr(ckpt.shutil, "disk_usage", _usage(12 * 2**10))
    target = tmp_path / "checkpoints" / "final.pt"
    with pytest.raises(ckpt.DiskFull) as err:
        ckpt.atomic_save({"w": torch.ones(2)}, target)
    text = str(err.value)
    assert text.startswith("the artifact disk is full: writing final.pt into ")
    assert str(target.parent) in text and "12.0 KiB free of 10.0 GiB" in text
    assert "DELETE /jobs/<id>" in text and "retry the job" in text
    assert err.value.errno == errno.ENOSPC and isinstance(err.value.__cause__, RuntimeError)
    assert list(target.parent.iterdir()) == []  # the partial temporary is gone


def test_torch_write_error_with_space_left_is_not_called_a_full_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ckpt.torch, "save", _failing_save(RuntimeError(TORCH_FULL)))
    monkeypatch.setattr(ckpt.shutil, "disk_usage", _usage(5 * 2**30))
    with pytest.raises(RuntimeError, match="unexpected pos") as err:
        ckpt.atomic_save({"w": torch.ones(2)}, tmp_path / "final.pt")
    assert not isinstance(err.value, ckpt.DiskFull)


def test_enospc_is_a_full_disk_whatever_the_free_space_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ckpt.torch, "save", _failing_save(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(ckpt.DiskFull, match="the artifact disk is full: writing step_0000010.pt"):
        ckpt.atomic_save({}, tmp_path / ckpt.periodic_name(10))
