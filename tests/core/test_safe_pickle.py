"""detectron2 `.pkl` files are read by a restricted unpickler: arrays and containers load, anything else is refused
by name before it runs (docs/teacher_layouts.md#reading-the-files)."""

from __future__ import annotations

import builtins
import os
import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from icd_core.teacher_import import detectron2_layout
from icd_core.teacher_import.safe_pickle import UnsafePickle, load_weights_pickle, to_tensors


class _Call:
    """Pickles as a call of `fn(*args)`: what a crafted weights file does."""

    def __init__(self, fn: object, *args: object):
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return self.fn, self.args


def _write(path: Path, obj: object, protocol: int = 2) -> Path:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_arrays_and_containers_load(tmp_path: Path, protocol: int) -> None:
    arrays = OrderedDict(
        [("a.weight", np.arange(6, dtype=np.float32).reshape(2, 3)), ("a.n", np.array(3, dtype=np.int64))]
    )
    obj = {"model": arrays, "__author__": "Detectron2 Model Zoo", "step": np.float64(1.5), "tags": ("x", [1, None])}
    got = load_weights_pickle(_write(tmp_path / "w.pkl", obj, protocol))
    assert got["__author__"] == "Detectron2 Model Zoo" and got["step"] == 1.5 and got["tags"] == ("x", [1, None])
    tensors = to_tensors(got["model"], "w.pkl")
    assert torch.equal(tensors["a.weight"], torch.arange(6, dtype=torch.float32).reshape(2, 3))
    assert tensors["a.n"].item() == 3


def _crafted(marker: Path) -> dict[str, object]:
    return {
        "os.system": _Call(os.system, f"touch {marker}"),
        "builtins.eval": _Call(builtins.eval, f"__import__('os').system('touch {marker}')"),
        "numpy fromfile": _Call(np.fromfile, "/etc/hostname"),
        "numpy load": _Call(np.load, str(marker)),
    }


@pytest.mark.parametrize("name", ["os.system", "builtins.eval", "numpy fromfile", "numpy load"])
def test_crafted_pickle_runs_nothing_and_names_the_global(tmp_path: Path, name: str) -> None:
    marker = tmp_path / "PWNED_x"
    payload = _crafted(marker)[name]
    path = _write(tmp_path / "evil.pkl", {"model": {"w": np.zeros(2, np.float32), "x": payload}})
    with pytest.raises(UnsafePickle, match=r"refused global \S+") as err:
        load_weights_pickle(path)
    assert not marker.exists()
    expected = {"os.system": "system", "builtins.eval": ".eval", "numpy fromfile": "fromfile"}
    assert expected.get(name, "numpy") in str(err.value)
    with pytest.raises(UnsafePickle):  # through the converter, too
        detectron2_layout.convert(path, "retinanet_R_50_FPN")
    assert not marker.exists()


def test_other_codecs_and_object_arrays_are_refused(tmp_path: Path) -> None:
    import codecs

    path = _write(tmp_path / "codec.pkl", {"model": {"w": _Call(codecs.encode, "x", "rot13")}})
    with pytest.raises(UnsafePickle, match="latin1"):
        load_weights_pickle(path)
    objects = np.array([1, "a"], dtype=object)
    got = load_weights_pickle(_write(tmp_path / "obj.pkl", {"model": {"w": objects}}))
    with pytest.raises(ValueError, match="w is a ndarray, not a numeric array"):
        to_tensors(got["model"], "obj.pkl")


def test_not_a_pickle_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "junk.pkl"
    path.write_bytes(b"\x00not a pickle")
    with pytest.raises(ValueError, match="not a readable pickle"):
        load_weights_pickle(path)
