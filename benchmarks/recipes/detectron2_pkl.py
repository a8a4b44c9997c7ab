"""A random detectron2 model-zoo `.pkl` of a given architecture, shaped by the key manifests in
tests/fixtures/teacher_layouts/ (written from detectron2's model code), for smoke runs of the recipes."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import numpy as np

MANIFESTS = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "teacher_layouts"


def random_detectron2_pkl(path: Path, arch: str, seed: int = 0) -> Path:
    """Fan-in-scaled weights and sane BN statistics, pickled as numpy arrays under 'model' as the zoo does."""
    keys = json.loads((MANIFESTS / f"detectron2_{arch}.json").read_text())["keys"]
    rng = np.random.default_rng(seed)
    model = {}
    for key, shape in keys.items():
        if key.endswith("running_var"):
            model[key] = (rng.random(shape) + 0.5).astype(np.float32)
        elif len(shape) <= 1:
            base = 1.0 if key.endswith(".weight") and ("norm" in key or ".bn" in key) else 0.0
            model[key] = (base + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            model[key] = (rng.standard_normal(shape) / math.sqrt(math.prod(shape[1:]))).astype(np.float32)
    path.write_bytes(pickle.dumps({"model": model, "__author__": "smoke"}, protocol=pickle.HIGHEST_PROTOCOL))
    return path
