"""What a checkpoint file is, judged from its keys: this service's own, or a detector trained elsewhere
(a torchvision, detectron2 or MMDetection file) that `icd import-teacher` converts.

Submit (`icd_core.checkpoint_gate`, for the API and `icd validate`) and the worker's reader
(`icd_core.detectors.read_checkpoint`) ask the same question here, so both answer with the same
sentence: what the file is and the command that converts it. No torch at import time: the API imports
this module, and only reading a file loads torch.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SERVICE_KEYS = ("model", "model_spec")  # every checkpoint this service writes holds both (detectors.detector_meta)
IMPORT_OUTPUT = "teacher.pt"
ANY_SOURCE = "torchvision|detectron2|mmdet"
# (blocks per stage, bottleneck blocks) -> ResNet depth, as torchvision, detectron2 and MMDetection build them.
RESNET_LAYOUTS = {
    ((2, 2, 2, 2), False): 18,
    ((3, 4, 6, 3), False): 34,
    ((3, 4, 6, 3), True): 50,
    ((3, 4, 23, 3), True): 101,
    ((3, 8, 36, 3), True): 152,
}


@dataclass(frozen=True)
class Verdict:
    """A file that is not this service's checkpoint: what it is, and how to make one of it."""

    what: str  # "a torchvision state dict"
    source: str | None = None  # the --from of `icd import-teacher`; None when unknown
    arch: str | None = None  # the --arch guessed from its keys; None when it cannot be told
    advice: str | None = None  # what to do instead of importing (a file of this service without its spec)

    def message(self, path: str | Path) -> str:
        command = import_command(path, self.source, self.arch)
        if self.source is None and self.advice is None:  # not recognised: what it is not, then the way in
            return f"{path} is {self.what}; if it is a detector trained elsewhere, convert it with: {command}"
        return (
            f"{path} is {self.what}, not a checkpoint of this service; {self.advice or 'convert it with: ' + command}"
        )


def import_command(path: str | Path, source: str | None, arch: str | None) -> str:
    """The `icd import-teacher` line that converts `path` (placeholders where a part is unknown)."""
    return f"icd import-teacher {path} --from {source or ANY_SOURCE} --arch {arch or 'NAME'} -o {IMPORT_OUTPUT}"


def is_service_checkpoint(obj: Any) -> bool:
    return isinstance(obj, Mapping) and all(k in obj for k in SERVICE_KEYS)


def detectron2_pickle(path: str | Path) -> Verdict | None:
    """A `.pkl` is detectron2's model-zoo format. It is judged by its name alone: a pickle is never
    unpickled to find out what it is."""
    if Path(path).suffix.lower() != ".pkl":
        return None
    return Verdict("a detectron2 pickle", "detectron2")


def identify(obj: Any, path: str | Path) -> Verdict | None:
    """None for a checkpoint of this service; otherwise what the loaded file `obj` is."""
    if is_service_checkpoint(obj):
        return None
    keys = _state_keys(obj)
    for judge in (_ours, _detectron2, _mmdet, _torchvision):
        verdict = judge(keys, path)
        if verdict is not None:
            return verdict
    return Verdict(
        "a torch file but not a detector checkpoint written by this service (no 'model'/'model_spec' keys), "
        "nor a torchvision, detectron2 or MMDetection detector this service recognises"
    )


def _state_keys(obj: Any) -> set[str]:
    """The tensor names of the state dict inside a loaded file (MMDetection: `state_dict`; detectron2 and
    torchvision's training references: `model`), without DataParallel's `module.` prefix."""
    if not isinstance(obj, Mapping):
        return set()
    for wrapper in ("state_dict", "model"):
        inner = obj.get(wrapper)
        if isinstance(inner, Mapping):
            obj = inner
            break
    return {str(k).removeprefix("module.") for k in obj}


def _has(keys: Iterable[str], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def _resnet_depth(keys: set[str], stage_prefixes: list[str]) -> int | None:
    """The ResNet depth of a trunk whose four stages' blocks are named `<prefix><block index>.`."""
    blocks = []
    for prefix in stage_prefixes:
        found = {int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
        blocks.append(len(found))
    bottleneck = _has(keys, f"{stage_prefixes[0]}0.conv3.")
    return RESNET_LAYOUTS.get((tuple(blocks), bottleneck))


def _ours(keys: set[str], path: str | Path) -> Verdict | None:
    if not _has(keys, "model.backbone.body.stages."):
        return None
    return Verdict(
        "a bare state dict of this service's detector (no 'model_spec' beside it)",
        advice="name the run's checkpoint file instead (checkpoints/final.pt of its run folder, or job:<id>)",
    )


def _family(keys: set[str], retinanet: str, fcos: str, faster_rcnn: str) -> str | None:
    """The detector family from one key each family's head alone has."""
    if fcos in keys:
        return "fcos"
    if retinanet in keys:
        return "retinanet"
    if faster_rcnn in keys:
        return "faster_rcnn"
    return None


def _arch(name: str, family: str | None, depth: int | None) -> str | None:
    """An architecture in its own project's words (`name` formats family and depth), R50 and R101 only."""
    return name.format(family=family, depth=depth) if family and depth in (50, 101) else None


def _detectron2(keys: set[str], path: str | Path) -> Verdict | None:
    if not _has(keys, "backbone.bottom_up."):
        return None
    family = _family(keys, "head.cls_score.weight", "head.ctrness.weight", "roi_heads.box_predictor.cls_score.weight")
    depth = _resnet_depth(keys, [f"backbone.bottom_up.res{i}." for i in range(2, 6)])
    return Verdict("a detectron2 checkpoint", "detectron2", _arch("{family}_R_{depth}_FPN", family, depth))


def _mmdet(keys: set[str], path: str | Path) -> Verdict | None:
    if not (_has(keys, "neck.") and _has(keys, "backbone.")) or _has(keys, "backbone.body."):
        return None
    family = _family(
        keys, "bbox_head.retina_cls.weight", "bbox_head.conv_centerness.weight", "roi_head.bbox_head.fc_cls.weight"
    )
    depth = _resnet_depth(keys, [f"backbone.layer{i}." for i in range(1, 5)])
    return Verdict("an MMDetection checkpoint", "mmdet", _arch("{family}_r{depth}_fpn", family, depth))


def _torchvision(keys: set[str], path: str | Path) -> Verdict | None:
    if not _has(keys, "backbone.body.") and not _has(keys, "backbone.fpn."):
        return None
    return Verdict("a torchvision state dict", "torchvision", _torchvision_arch(keys, Path(path).name))


def _torchvision_arch(keys: set[str], filename: str) -> str | None:
    """The torchvision builder whose state dict has these keys (the model zoo's detection architectures)."""
    if "backbone.body.0.0.weight" in keys and "rpn.head.cls_logits.weight" in keys:  # MobileNetV3 trunk
        return "fasterrcnn_mobilenet_v3_large_320_fpn" if "320" in filename else "fasterrcnn_mobilenet_v3_large_fpn"
    if _resnet_depth(keys, [f"backbone.body.layer{i}." for i in range(1, 5)]) != 50 or _has(keys, "roi_heads.mask"):
        return None  # torchvision ships no other trunk, and no importer reads mask or keypoint heads
    if "head.regression_head.bbox_ctrness.weight" in keys:
        return "fcos_resnet50_fpn"
    if "head.classification_head.cls_logits.weight" in keys:  # v2: GroupNorm after each head conv
        v2 = "head.classification_head.conv.0.1.weight" in keys
        return "retinanet_resnet50_fpn_v2" if v2 else "retinanet_resnet50_fpn"
    if "roi_heads.box_predictor.cls_score.weight" in keys and not _has(keys, "roi_heads.keypoint"):
        v2 = "roi_heads.box_head.0.0.weight" in keys  # v2: a conv box head instead of fc6/fc7
        return "fasterrcnn_resnet50_fpn_v2" if v2 else "fasterrcnn_resnet50_fpn"
    return None


def read_verdict(path: str | Path) -> tuple[dict[str, Any] | None, Verdict | None]:
    """(model spec, None) for a checkpoint of this service, (None, verdict) for any other file torch reads,
    (None, None) for a file it cannot read (the worker's reader names that one when the job starts).

    Tensors are memory-mapped, so a large file is not read whole; a `.pkl` is judged by its name.
    """
    pickle_verdict = detectron2_pickle(path)
    if pickle_verdict is not None:
        return None, pickle_verdict
    from .engine.checkpoint import NotACheckpoint, load_checkpoint  # torch: only when a file is read

    try:
        obj = load_checkpoint(path, mmap=True)
    except (NotACheckpoint, OSError):
        return None, None
    verdict = identify(obj, path)
    if verdict is not None:
        return None, verdict
    spec = obj.get("model_spec")
    return (dict(spec) if isinstance(spec, Mapping) else {}), None
