"""Read detectron2's `.pkl` weight files without letting the file run code.

A pickle names the functions it calls; `pickle.load` imports and calls whatever it names, so a crafted
`.pkl` can run any command. detectron2's model zoo stores `{"model": {name: numpy array}, "__author__": ...}`
(or a bare dict of arrays), which needs only numpy's array reconstruction and plain containers. This reader
admits exactly those globals and refuses any other by name, before anything is called.
"""

from __future__ import annotations

import importlib
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

# What pickled numpy arrays (protocols 0-5, numpy 1.x as numpy.core, 2.x as numpy._core) refer to.
_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")
_NUMPY_NAMES = ("_reconstruct", "scalar")
_MULTIARRAY = importlib.import_module("numpy._core.multiarray" if hasattr(np, "_core") else "numpy.core.multiarray")
_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("collections", "OrderedDict"): dict,  # a state dict saved as OrderedDict: read as a plain dict
}


class UnsafePickle(ValueError):
    """The pickle names a global that plain weights never need (it would run code when loaded)."""


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """Python 3 writes `bytes` into protocol-2 pickles as `_codecs.encode(text, 'latin1')`; only that is admitted."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise UnsafePickle(f"refused _codecs.encode with encoding {encoding!r}: weight files only use latin1")
    return text.encode("latin1")


class _WeightsUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module in _NUMPY_MODULES and name in _NUMPY_NAMES:
            return getattr(_MULTIARRAY, name)
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if (module, name) == ("_codecs", "encode"):
            return _latin1_bytes
        if module in ("numpy.core.numeric", "numpy._core.numeric") and name == "_frombuffer":
            return _frombuffer  # protocol-5 arrays: bytes, dtype and shape, nothing else
        raise UnsafePickle(
            f"refused global {module}.{name}: a weights .pkl holds only numpy arrays and plain containers, "
            "so this file is not one (loading it with pickle would call that function)"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickle("refused a persistent id: a weights .pkl has none")


def _frombuffer(buf: Any, dtype: np.dtype, shape: tuple[int, ...], order: str) -> np.ndarray:
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise UnsafePickle("refused a protocol-5 array of objects: weights are numbers")
    array = np.frombuffer(buf, dtype=dtype)
    return array.reshape(shape, order="F" if order == "F" else "C")


def load_weights_pickle(path: Path) -> Any:
    """The unpickled object, built from numpy arrays and containers only (UnsafePickle otherwise)."""
    data = Path(path).read_bytes()
    try:
        return _WeightsUnpickler(io.BytesIO(data), encoding="latin1").load()
    except UnsafePickle:
        raise
    except Exception as err:  # truncated or not a pickle at all
        raise ValueError(f"{path}: not a readable pickle ({type(err).__name__}: {err})") from err


def to_tensors(arrays: dict[str, Any], source: str) -> dict[str, Tensor]:
    """numpy arrays (or tensors) as tensors; a value that is not a numeric array is named."""
    out: dict[str, Tensor] = {}
    for key, value in arrays.items():
        if isinstance(value, Tensor):
            out[key] = value
        elif isinstance(value, np.ndarray) and value.dtype.kind in "fiub":
            out[key] = torch.from_numpy(np.array(value))  # a writable copy: the pickle's buffers are read-only
        else:
            raise ValueError(f"{source}: {key} is a {type(value).__name__}, not a numeric array")
    return out
