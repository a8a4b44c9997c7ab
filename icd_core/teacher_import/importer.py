"""One import: read the source file with its layout's converter, choose the classes, write our checkpoint.

The converter is picked by name (`--from`); the detectron2 and MMDetection converters read the file
themselves (a detectron2 `.pkl` needs a restricted unpickler), the torchvision one gets `torch.load`'s dict.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from icd_core.engine.checkpoint import NotACheckpoint, load_checkpoint

from . import detectron2_layout, mmdet_layout, torchvision_layout
from .classes import select_classes
from .layout import ImportedDetector
from .write import write_imported

SOURCES = ("torchvision", "detectron2", "mmdet")


class TeacherImportError(ValueError):
    """An import that cannot proceed; the message says what to fix (the CLI prints it, exit code 2)."""


@dataclass
class ImportResult:
    """What `import_teacher` wrote, for the command's report."""

    out: Path
    meta: dict[str, Any]
    imported: ImportedDetector


def _torch_file(path: Path) -> dict[str, Any]:
    try:
        return load_checkpoint(path)
    except NotACheckpoint as err:
        cause = err.__cause__
        why = f"{type(cause).__name__}: {str(cause).strip().splitlines()[0][:160]}" if cause else str(err)
        raise TeacherImportError(
            f"{path}: not a torch file that loads as data (torch.load with weights_only=True): {why}"
        ) from err


def convert_file(source: str, path: Path, arch: str) -> ImportedDetector:
    """The source file as an `ImportedDetector`, by the converter of `source` (torchvision, detectron2, mmdet)."""
    if source == "torchvision":
        torchvision_layout.architecture(arch)  # a wrong --arch is named before the file is read
        return torchvision_layout.convert(_torch_file(path), arch)
    if source == "detectron2":
        return detectron2_layout.convert(path, arch)
    if source == "mmdet":
        return mmdet_layout.convert(path, arch)
    raise TeacherImportError(f"--from {source}: unknown source; choose from {', '.join(SOURCES)}")


def import_teacher(
    src: Path,
    source: str,
    arch: str,
    out: Path,
    classes: Path | None = None,
    allow_untrained: bool = False,
) -> ImportResult:
    """Convert `src`, keep the classes `classes` lists (default: the source's COCO categories), write `out`."""
    imported = convert_file(source, Path(src), arch)
    selected, names, cat_ids, untrained = select_classes(imported, classes, allow_untrained)
    meta = write_imported(selected, Path(out), names, cat_ids, Path(src), untrained)
    return ImportResult(Path(out), meta, selected)
