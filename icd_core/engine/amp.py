"""Mixed precision choice: bf16 autocast where the GPU has it, fp16 + GradScaler otherwise, off on CPU."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AmpConfig:
    dtype: torch.dtype | None  # None: full fp32
    device_type: str

    @property
    def enabled(self) -> bool:
        return self.dtype is not None

    @property
    def needs_scaler(self) -> bool:
        """fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none."""
        return self.dtype is torch.float16

    @property
    def name(self) -> str:
        return {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def resolve_amp(mode: str, device: torch.device) -> AmpConfig:
    """Map schedule.amp (auto|off|bf16|fp16) to a concrete setting for `device`."""
    if mode == "off" or device.type != "cuda":
        # CPU autocast is slower than fp32 for these convnets, so AMP is a GPU-only setting.
        return AmpConfig(None, device.type)
    if mode == "auto":
        return AmpConfig(torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16, "cuda")
    if mode == "bf16":
        if not torch.cuda.is_bf16_supported():
            raise ValueError("schedule.amp: this GPU has no bf16; use amp: fp16 or auto")
        return AmpConfig(torch.bfloat16, "cuda")
    return AmpConfig(torch.float16, "cuda")


def make_scaler(amp: AmpConfig) -> torch.amp.GradScaler:
    """A GradScaler that is a no-op unless fp16 is in use (so the loop has one code path)."""
    return torch.amp.GradScaler("cuda", enabled=amp.needs_scaler)
