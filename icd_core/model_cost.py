"""What a model costs to run: parameters, GFLOPs, peak inference memory and batch-1 latency.

Everything is measured on one image at the evaluation size, with the detector in eval mode, the way a
deployment would call it. GFLOPs come from `torch.utils.flop_counter` (a multiply-add counts 2; only
the ops it knows — convolutions and matrix products — are counted, so NMS and box decoding are free).
Peak inference memory on a GPU is torch's allocator high-water mark during one forward; on the CPU,
where torch keeps no such figure, it is the weights plus the peak of live tensors the forward
created, tracked op by op (a dispatch mode), which is what the forward needs beyond the process.
"""

from __future__ import annotations

import contextlib
import statistics
import time
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

MB = 2**20


@dataclass
class ModelCost:
    params_m: float  # millions of parameters
    gflops: float  # at `image_size`, one image
    peak_inference_mb: float
    latency_ms: dict[str, float]  # median batch-1 latency per runtime: eager, torchscript, onnxruntime
    image_size: list[int]  # [H, W] of the measured input (before the model's own resize)
    device: str
    threads: int
    repeats: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_gflops(forward: Callable[[], Any]) -> float:
    """FLOPs of one call of `forward` (no grad), in units of 1e9."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        forward()
    return counter.get_total_flops() / 1e9


class _LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storage created inside the mode and still referenced (CPU memory figure)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, int] = {}  # storage address -> tensors alive on it
        self._sizes: dict[int, int] = {}

    def _release(self, ptr: int) -> None:
        self._refs[ptr] -= 1
        if self._refs[ptr] == 0:
            del self._refs[ptr]
            self.live -= self._sizes.pop(ptr)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
                if ptr not in self._refs:
                    self._refs[ptr] = 0
                    self._sizes[ptr] = storage.nbytes()
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                self._refs[ptr] += 1
                weakref.finalize(t, self._release, ptr)
        return out


def peak_inference_mb(model: nn.Module, forward: Callable[[], Any], device: torch.device) -> float:
    """Peak memory of one no-grad forward (see the module docstring for what is counted where)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad():
            forward()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / MB
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    mode = _LiveTensorBytes()
    with torch.no_grad(), mode:
        forward()
    return (weights + mode.peak) / MB


def median_latency_ms(
    forward: Callable[[], Any], repeats: int, warmup: int, device: torch.device | None = None
) -> float:
    """Median wall time of `forward` over `repeats` calls after `warmup` untimed ones (ms)."""
    sync = torch.cuda.synchronize if device is not None and device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        forward()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        forward()
        sync()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def measure_cost(
    model: nn.Module,
    image: Tensor,
    device: torch.device | str = "cpu",
    repeats: int = 20,
    warmup: int = 3,
    exported: dict[str, Callable[[Tensor], Any]] | None = None,
    autocast: torch.dtype | None = None,
) -> ModelCost:
    """Cost of `model` (a torchvision detector taking a list of images) on one `image` [3, H, W].

    exported: extra runtimes to time on the same image (name -> callable), e.g. a TorchScript module
    or an ONNX Runtime session wrapped by `icd_core.export.ExportedDetector.run` (CPU).
    autocast: run the eager forward under torch.autocast with this dtype (bf16/fp16 on a GPU).
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    x = image.to(device)

    def forward() -> Any:
        amp = torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
        with torch.inference_mode(), amp:
            return model([x])

    try:
        gflops = count_gflops(forward)
        memory = peak_inference_mb(model, forward, device)
        latency = {"eager": median_latency_ms(forward, repeats, warmup, device)}
        cpu_image = image.cpu()
        for name, run in (exported or {}).items():
            latency[name] = median_latency_ms(lambda run=run: run(cpu_image), repeats, warmup)
    finally:
        model.train(was_training)
    return ModelCost(
        params_m=count_params(model) / 1e6,
        gflops=gflops,
        peak_inference_mb=memory,
        latency_ms=latency,
        image_size=[int(image.shape[-2]), int(image.shape[-1])],
        device=str(device),
        threads=torch.get_num_threads(),
        repeats=repeats,
    )
