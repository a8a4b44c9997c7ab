"""Choose which of an imported detector's classes a checkpoint keeps, and cut its class rows to match.

Without an annotation file, every label that is a COCO category is kept, in the source's order, with its
COCO id. With one, the checkpoint predicts exactly the file's categories, in the file's order and with its
ids, matched to the source's categories by name (case- and space-insensitive). A category the source never
learned is refused, unless `allow_untrained`: then its rows start at the classifier's prior (it never
fires) and the checkpoint lists it under `untrained_categories`, so a distill job knows the teacher
cannot teach it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor

from .coco_categories import COCO_CATEGORIES
from .layout import ImportedDetector

_SIGMOID_CLS = "model.head.classification_head.cls_logits."
_RCNN_CLS = "model.roi_heads.box_predictor.cls_score."
_RCNN_BOX = "model.roi_heads.box_predictor.bbox_pred."
PRIOR_PROBABILITY = 0.01  # RetinaNet/FCOS classifier bias init: a new class starts (and stays) silent
_COCO_NAME = dict(COCO_CATEGORIES)


class ClassSelectionError(ValueError):
    """The annotation file asks for categories the teacher cannot provide (or is not a COCO file)."""


def _key(name: str) -> str:
    return " ".join(name.lower().split())


def read_categories(annotations: Path) -> list[tuple[int, str]]:
    """(id, name) of every category in a COCO annotation file, in the file's order."""
    try:
        data = json.loads(Path(annotations).read_text())
        return [(int(c["id"]), str(c["name"])) for c in data["categories"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ClassSelectionError(f"--classes {annotations}: not a readable COCO annotation file ({err})") from err


def select_classes(
    imported: ImportedDetector, annotations: Path | None = None, allow_untrained: bool = False
) -> tuple[ImportedDetector, list[str], list[int], list[str]]:
    """(model cut to the kept classes, class names, their category ids, untrained category names)."""
    by_name = {_key(_COCO_NAME[c]): i for i, c in enumerate(imported.label_cat_ids) if c in _COCO_NAME}
    if annotations is None:
        rows = [i for i, c in enumerate(imported.label_cat_ids) if c is not None]
        cat_ids = [int(imported.label_cat_ids[i]) for i in rows]  # type: ignore[arg-type]
        names = [_COCO_NAME.get(c, f"class{c}") for c in cat_ids]
        return _cut(imported, rows), names, cat_ids, []
    wanted = read_categories(annotations)
    rows_or_new: list[int | None] = [by_name.get(_key(name)) for _, name in wanted]
    untrained = [name for (_, name), row in zip(wanted, rows_or_new, strict=True) if row is None]
    if untrained and not allow_untrained:
        raise ClassSelectionError(
            f"--classes {annotations}: the teacher never learned {', '.join(untrained[:10])}"
            + (f" (+{len(untrained) - 10} more)" if len(untrained) > 10 else "")
            + "; rename them to the teacher's category names, drop them, or pass --allow-untrained "
            "to add them as classes the teacher never predicts"
        )
    model = _cut(imported, rows_or_new)
    return model, [name for _, name in wanted], [cid for cid, _ in wanted], untrained


def _cut(imported: ImportedDetector, rows: list[int | None]) -> ImportedDetector:
    """The detector with class rows `rows` (None: a new, silent class) in that order."""
    n_src = len(imported.label_cat_ids)
    state = dict(imported.state)
    for key in (k for k in state if k.startswith(_SIGMOID_CLS)):
        state[key] = _take_anchor_major(state[key], n_src, rows)
    for key in (k for k in state if k.startswith(_RCNN_CLS)):
        state[key] = _take_with_background(state[key], rows, per_class=1, new=_silent_rcnn_row)
    for key in (k for k in state if k.startswith(_RCNN_BOX)):
        state[key] = _take_with_background(state[key], rows, per_class=4, new=torch.zeros_like)
    return ImportedDetector(
        imported.spec,
        state,
        [imported.label_cat_ids[r] if r is not None else None for r in rows],
        imported.test_size,
        imported.max_size,
        imported.source,
        list(imported.notes),
    )


def _take_anchor_major(t: Tensor, n_src: int, rows: list[int | None]) -> Tensor:
    """Rows laid out as anchor * classes + class (RetinaNet, FCOS with one anchor)."""
    anchors = t.shape[0] // n_src
    grouped = t.reshape(anchors, n_src, *t.shape[1:])
    out = []
    for r in rows:
        if r is not None:
            out.append(grouped[:, r])
        elif t.dim() == 1:  # bias: the focal-loss prior, so the class stays below any threshold
            out.append(torch.full_like(grouped[:, 0], -math.log((1 - PRIOR_PROBABILITY) / PRIOR_PROBABILITY)))
        else:
            out.append(torch.randn_like(grouped[:, 0]) * 0.01)
    return torch.stack(out, dim=1).reshape(anchors * len(rows), *t.shape[1:])


def _silent_rcnn_row(row: Tensor) -> Tensor:
    return torch.full_like(row, -20.0) if row.dim() == 1 else torch.zeros_like(row)


def _take_with_background(t: Tensor, rows: list[int | None], per_class: int, new: object) -> Tensor:
    """Faster R-CNN predictor rows: background first, then one block of `per_class` rows per class."""
    blocks = t.reshape(-1, per_class, *t.shape[1:])
    out = [blocks[0]] + [blocks[r + 1] if r is not None else new(blocks[0]) for r in rows]  # type: ignore[operator]
    return torch.stack(out).reshape(-1, *t.shape[1:])
