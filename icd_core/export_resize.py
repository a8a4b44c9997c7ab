"""The exported models' resize: the integer size eager torchvision picks, in eager, scripted and traced code.

torchvision's `GeneralizedRCNNTransform` picks the resize scale in float64 when it runs eagerly but in
float32 when it is scripted or traced, and `interpolate` floors `side * scale`. For sides whose exact
product is an integer (a 375x500 photo at min_size 128: 375 * 128/375) the float32 scale lands a hair
below, so TorchScript and ONNX resize that photo to 127x170 where eager gives 128x170, and every box
moves. `ExactResizeTransform` computes the output size once, the eager way (float64 division,
product, floor), in each mode and passes `interpolate` that size instead of a scale: the kernel then
sees the same (input, output) sizes as in eager mode.
"""

# No `from __future__ import annotations`: TorchScript cannot resolve the string annotations of the
# @torch.jit.unused helper.
import math

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes


def eager_resized_size(height: int, width: int, min_size: int, max_size: int) -> list[int]:
    """[h, w] after torchvision's eager resize: shorter side to min_size unless the longer passes max_size."""
    scale = min(float(min_size) / float(min(height, width)), float(max_size) / float(max(height, width)))
    return [int(math.floor(float(height) * scale)), int(math.floor(float(width) * scale))]


@torch.jit.unused
def _traced_resized_size(image: Tensor, min_size: int, max_size: int) -> list[int]:
    """`eager_resized_size` as float64 graph ops, so an ONNX graph resizes each input by its own shape."""
    from torch.onnx import operators

    # 1-D tensors throughout: the exporter casts 0-dim float64 operands of Div/Mul to float32, and traces
    # `float / tensor` as a reciprocal times the float; either loses eager's float64 scale.
    hw = operators.shape_as_tensor(image)[-2:].to(torch.float64)
    limits = torch.tensor([min_size, max_size], dtype=torch.float64)
    sides = torch.stack([hw.min(), hw.max()])
    scale = torch.amin(limits / sides, dim=0, keepdim=True)
    out = torch.floor(hw * scale).to(torch.int64)
    return [out[0], out[1]]  # 0-dim tensors while tracing; typed list[int] for TorchScript


class ExactResizeTransform(GeneralizedRCNNTransform):
    """`GeneralizedRCNNTransform` for inference exports: eager's output size in every mode (see module doc).

    Training-time choices (a random min_size, `_skip_resize`, `fixed_size`) do not apply to an export and
    are not honoured: the resize always targets the largest min_size, as torchvision does in eval mode.
    """

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor] | None]:
        height, width = image.shape[-2:]
        min_size, max_size = self.min_size[-1], self.max_size
        if torchvision._is_tracing():
            size = _traced_resized_size(image, min_size, max_size)
        else:
            size = eager_resized_size(height, width, min_size, max_size)
        image = nn.functional.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        if target is not None:
            target["boxes"] = resize_boxes(target["boxes"], [height, width], [image.shape[-2], image.shape[-1]])
        return image, target


def exact_resize_transform(transform: GeneralizedRCNNTransform) -> ExactResizeTransform:
    """An `ExactResizeTransform` with `transform`'s sizes and normalization."""
    return ExactResizeTransform(
        transform.min_size,
        transform.max_size,
        transform.image_mean,
        transform.image_std,
        transform.size_divisible,
        transform.fixed_size,
    )


def with_exact_resize(model: nn.Module) -> nn.Module:
    """A shallow copy of a torchvision detector that resizes with `ExactResizeTransform`.

    Every other submodule (and so every weight) is shared; the caller's model keeps its own transform.
    """
    clone = model.__class__.__new__(model.__class__)
    clone.__dict__ = dict(model.__dict__)
    clone._modules = dict(model._modules)
    clone.transform = exact_resize_transform(model.transform)
    return clone


# --- verification probes ------------------------------------------------------------------------------
def float32_scale_floors_low(side: int, target: int) -> bool:
    """Whether torchvision's scripted resize (float32 scale) gives `side` another size than eager does."""
    scale32 = (torch.tensor(float(target)) / torch.tensor(float(side))).item()
    return math.floor(side * scale32) != math.floor(side * (target / side))


def rounding_side(target: int, near: int) -> int:
    """The first side from `near` up that a float32 resize scale to `target` rounds differently (else `near`)."""
    for side in range(max(near, 1), 2 * max(near, 1) + 1):
        if float32_scale_floors_low(side, target):
            return side
    return max(near, 1)


def probe_shapes(min_size: int, max_size: int) -> dict[str, tuple[int, int]]:
    """(H, W) of verification images: portrait, landscape, square and extreme in both directions.

    Each one's bounding side (the shorter one, or the longer where max_size binds) is a size whose
    resize scale float32 gets wrong, so an export that resizes unlike eager shows in its detections.
    """
    short = rounding_side(min_size, (3 * min_size) // 2)  # downscaled, as a photo larger than the model size
    small = rounding_side(min_size, (3 * min_size) // 4)  # upscaled, as a small photo
    long = rounding_side(max_size, (3 * max_size) // 2)
    extreme = max(1, long // 5)  # 1:5, so max_size binds unless max_size >= 5 * min_size
    landscape = (short, (4 * short) // 3)
    return {
        "landscape": landscape,
        "portrait": (landscape[1], landscape[0]),
        "square": (small, small),
        "wide": (extreme, long),
        "tall": (long, extreme),
    }


def probe_images(source: Tensor | None, min_size: int, max_size: int) -> list[tuple[str, Tensor]]:
    """`source` (or seeded noise without one) resampled to each of `probe_shapes`, named "landscape 201x268"."""
    if source is None:
        source = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    out = []
    for name, (h, w) in probe_shapes(min_size, max_size).items():
        image = nn.functional.interpolate(source[None].float(), size=[h, w], mode="bilinear", align_corners=False)
        out.append((f"{name} {h}x{w}", image[0].clamp(0, 1)))
    return out
