"""What every source layout's converter returns: our model spec, our state dict, and its class space."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from icd_core.spec import ModelSpec


@dataclass
class ImportedDetector:
    """A converted model, still over the source's full class space.

    `state` uses this service's keys (`build_detector(spec, len(label_cat_ids))` loads it strictly).
    `label_cat_ids[i]` is the COCO category id of output label i, or None for a label the source
    reserves but no category uses (torchvision's 0 and its ten unused COCO ids); class selection
    (`classes.select_classes`) cuts those rows out. Faster R-CNN states keep torchvision's convention:
    background is row 0 of `cls_score`/`bbox_pred`, before label 0.
    """

    spec: ModelSpec
    state: dict[str, Tensor]
    label_cat_ids: list[int | None]
    test_size: int = 800
    max_size: int = 1333
    source: str = ""
    notes: list[str] = field(default_factory=list)
