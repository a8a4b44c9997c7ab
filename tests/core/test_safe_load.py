"""The one checkpoint reader: a file a user names is data (`weights_only=True`), never code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from icd_core.detectors import load_detector, read_checkpoint
from icd_core.engine.checkpoint import NotACheckpoint, load_checkpoint


def test_a_malicious_pickle_runs_nothing_through_any_reader(tmp_path: Path, malicious_checkpoint: Any) -> None:
    marker = tmp_path / "pwned"
    bad = malicious_checkpoint(tmp_path / "teacher.pt", marker)
    for reader in (load_checkpoint, read_checkpoint, load_detector):
        with pytest.raises(NotACheckpoint, match="not a checkpoint written by this service") as info:
            reader(bad)
        assert str(bad) in str(info.value) and "state dict" in str(info.value)
    assert not marker.exists()
    with pytest.raises(NotACheckpoint):  # also a raw pickle.dump, not only torch.save's zip format
        load_checkpoint(malicious_checkpoint(tmp_path / "raw.pt", marker, raw_pickle=True))
    assert not marker.exists()


def test_garbage_and_foreign_files_say_what_they_are_not(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a torch file at all")
    with pytest.raises(NotACheckpoint, match=f"{garbage} is not a checkpoint written by this service"):
        read_checkpoint(garbage)
    tensor_file = tmp_path / "tensor.pt"
    torch.save(torch.zeros(2), tensor_file)
    with pytest.raises(NotACheckpoint, match="holds a Tensor, not a dict"):
        read_checkpoint(tensor_file)
    state_dict = tmp_path / "state_dict.pt"
    torch.save({"w": torch.zeros(2)}, state_dict)
    assert torch.equal(load_checkpoint(state_dict)["w"], torch.zeros(2))  # plain state dicts load
    with pytest.raises(ValueError, match="not a detector checkpoint written by this service"):
        read_checkpoint(state_dict)  # but are no detector to build
