"""Write an imported detector as a checkpoint of this service (what `load_detector` and job specs read)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from icd_core.atomic_files import replaced_atomically
from icd_core.detectors import build_detector, detector_meta, load_weights
from icd_core.hashing import sha256_file

from .layout import ImportedDetector


def write_imported(
    imported: ImportedDetector,
    out: Path,
    class_names: list[str],
    label_to_cat_id: list[int],
    source_file: Path,
    untrained: list[str] | None = None,
) -> dict[str, Any]:
    """Build the model from the spec, load the state strictly (so a wrong mapping fails here, not in a job)
    and save it; returns the checkpoint's metadata."""
    detector = build_detector(imported.spec, len(class_names), imported.test_size, imported.max_size)
    load_weights(detector, imported.state, source=f"{source_file} converted as {imported.source}")
    meta: dict[str, Any] = {
        **detector_meta(detector, class_names, label_to_cat_id),
        "input_size": {"test_size": imported.test_size, "max_size": imported.max_size},
        "imported_from": {
            "layout": imported.source,
            "file": Path(source_file).name,
            "sha256": sha256_file(Path(source_file)),
            "untrained_categories": list(untrained or []),
            "notes": list(imported.notes),
        },
    }
    with replaced_atomically(out) as tmp:
        torch.save({"model": detector.state_dict(), **meta}, tmp)
    return meta
