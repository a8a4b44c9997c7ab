"""`icd import-teacher`: a detector trained elsewhere (torchvision, detectron2, MMDetection) as a checkpoint
of this service, which a spec names as `teacher.checkpoint` (docs/usage.md#bring-your-own-teacher)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

SOURCES = ("torchvision", "detectron2", "mmdet")  # icd_core.teacher_import.importer.SOURCES, without importing torch


class ImportFailed(click.ClickException):
    """A refused import: the message alone, exit code 2 (as for a usage error), no traceback."""

    exit_code = 2


def _names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", … (+{len(names) - limit} more)" if len(names) > limit else "")


def _report(src: Path, arch: str, meta: dict[str, Any]) -> list[str]:
    spec, origin = meta["model_spec"], meta["imported_from"]
    size = meta["input_size"]
    untrained = origin["untrained_categories"]
    lines = [
        f"wrote {meta['out']}",
        f"  source: {src} ({origin['layout']}), sha256 {origin['sha256']}",
        f"  model: {spec['detector']} on {spec['backbone']}, norm {spec['norm']}; --arch {arch}",
        f"  input size: short side {size['test_size']}, long side at most {size['max_size']}",
        f"  classes kept: {len(meta['class_names'])} ({_names(meta['class_names'])})",
        f"  untrained categories: {_names(untrained) if untrained else 'none'}",
    ]
    lines += [f"  note: {note}" for note in origin["notes"]]
    return lines


@click.command("import-teacher")
@click.argument("src", type=click.Path(path_type=Path))
@click.option("--from", "source", required=True, type=click.Choice(SOURCES), help="The project that wrote SRC.")
@click.option("--arch", required=True, help="The source's architecture name, e.g. retinanet_resnet50_fpn.")
@click.option(
    "--classes",
    type=click.Path(path_type=Path),
    default=None,
    help="COCO annotation file: keep exactly its categories, in its order, with its ids (default: the source's).",
)
@click.option(
    "--allow-untrained",
    is_flag=True,
    help="Keep --classes categories the source never learned (they never fire; the checkpoint lists them).",
)
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path), help="Checkpoint to write (.pt).")
def import_teacher_cmd(
    src: Path, source: str, arch: str, classes: Path | None, allow_untrained: bool, output: Path
) -> None:
    """Convert SRC, a detector trained with torchvision, detectron2 or MMDetection, into a checkpoint."""
    from icd_core.teacher_import.importer import import_teacher

    try:
        result = import_teacher(src, source, arch, output, classes, allow_untrained)
    except (ValueError, FileNotFoundError) as err:
        raise ImportFailed(f"{src}: {err}" if str(src) not in str(err) else str(err)) from err
    for line in _report(src, arch, {**result.meta, "out": result.out}):
        click.echo(line)
