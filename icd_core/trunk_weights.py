"""ImageNet weights for a ResNet trunk, from a torchvision classification state dict.

A detector's trunk starts from ImageNet in every published COCO result; only MobileNetV2's weights ship
with this project (offline wheel). For ResNets a spec names the file (`backbone_weights`), for example
torchvision's `resnet50-0676ba61.pth`; its keys `conv1.*`, `bn1.*`, `layer1..4.*` map onto the trunk's
stages and the classifier (`fc.*`) is dropped. Loading is strict on the trunk, so a file of another
depth or layout fails with the keys that differ.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from .detectors import Detector
from .engine.checkpoint import load_checkpoint

_PREFIXES = {"conv1.": "0.0.", "bn1.": "0.1.", "layer1.": "1.", "layer2.": "2.", "layer3.": "3.", "layer4.": "4."}


def trunk_state_from_torchvision(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """torchvision ResNet classification keys -> our `Trunk.stages` keys (the classifier dropped)."""
    out = {}
    for key, value in state.items():
        for src, dst in _PREFIXES.items():
            if key.startswith(src):
                out[dst + key[len(src) :]] = value
                break
    return out


def _unwrap(obj: dict) -> dict[str, Tensor]:
    for key in ("state_dict", "model"):
        if isinstance(obj.get(key), dict):
            return obj[key]
    return obj


def load_trunk_weights(detector: Detector, path: Path, field: str) -> int:
    """Load `path` into the detector's trunk; returns the number of tensors loaded."""
    state = trunk_state_from_torchvision(_unwrap(load_checkpoint(path)))
    stages = detector.model.backbone.body.stages
    own = {k: v for k, v in stages.state_dict().items() if not k.endswith("num_batches_tracked")}
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        detail = "; ".join(
            f"{what}: {', '.join(keys[:4])}" + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape differs", shapes))
            if keys
        )
        raise ValueError(
            f"{field}: {path} is not a torchvision ImageNet {detector.spec.backbone} state dict ({detail}); "
            "give the classification weights of the same depth (e.g. torchvision's resnet50-0676ba61.pth)"
        )
    stages.load_state_dict(state, strict=False)  # strict on everything but BN step counters (checked above)
    return len(state)
