"""ICD instance queries (docs/method/icd.md#instance-queries): real + fake instances, descriptors, instance encoder.

Every ground-truth box becomes a query; fake boxes drawn from the training set's class priors are
added so the auxiliary "is it real?" task has negatives. Descriptors carry only class, a jittered
reference point and coarse scale bins, never the exact box, so the decoder must look at the features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

COORD_PE_DIMS = 128  # per coordinate: 64 sin + 64 cos
NUM_SCALE_BINS = 5
SIZE_CLIP = (0.002, 0.7)  # normalized fake box side
CENTRE_CLIP = (0.03, 0.97)  # normalized fake box centre


def descriptor_dims(num_classes: int) -> int:
    """one-hot class ‖ PE(p_x) ‖ PE(p_y) ‖ one-hot w bin ‖ one-hot h bin."""
    return num_classes + 2 * COORD_PE_DIMS + 2 * NUM_SCALE_BINS


def query_count(n_real: int, neg_per_pos: float, max_queries: int) -> int:
    """K = min(max(1, ⌊(1+ρ)·n_r⌋), max(MAX_Q, n_r)): real first, the rest fake; ≥ 1 even without GT."""
    k = max(1, math.floor((1.0 + neg_per_pos) * n_real + 1e-9))
    return min(k, max(max_queries, n_real))


def scale_bin(size_px: Tensor) -> Tensor:
    """bin(s) = clamp(trunc(1.44·ln s − 5), 0, 4): <64, 64–128, 128–256, 256–512, ≥512 px (roughly)."""
    s = size_px.float().clamp(min=1e-6)
    return torch.trunc(1.44 * torch.log(s) - 5.0).clamp(0, NUM_SCALE_BINS - 1).long()


def coordinate_encoding(t: Tensor, dims: int = COORD_PE_DIMS) -> Tensor:
    """PE(t) = [sin(2π·t·ω_k)]_k ‖ [cos(2π·t·ω_k)]_k with ω_k = 10000^(−k/(dims/2)); t in [0,1]."""
    half = dims // 2
    omega = 10000.0 ** (-torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angle = 2 * math.pi * t.float()[..., None] * omega
    return torch.cat([angle.sin(), angle.cos()], dim=-1)


@dataclass
class ClassPriorTensors:
    """freq [C], wh_mean [C,2], wh_std [C,2] of normalized box sides; what fake sampling needs."""

    freq: Tensor
    wh_mean: Tensor
    wh_std: Tensor


@dataclass
class InstanceQueries:
    """A batch of queries padded to K_max. Boxes and points are normalized by each image's own size."""

    descriptors: Tensor  # [N, K, D], no grad
    valid: Tensor  # [N, K] bool: a real or fake query (not batch padding)
    real: Tensor  # [N, K] bool: a ground-truth instance
    ref_points: Tensor  # [N, K, 2] jittered (p_x, p_y)
    boxes: Tensor  # [N, K, 4] (cx, cy, w, h)
    labels: Tensor  # [N, K] long

    @property
    def num_real(self) -> int:
        return int(self.real.sum())

    @property
    def num_fake(self) -> int:
        return int((self.valid & ~self.real).sum())


def sample_fakes(count: int, priors: ClassPriorTensors, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Draw `count` fake (label [M], cxcywh [M,4]) on the CPU from the class priors (numeric class ids)."""
    freq = priors.freq.detach().float().cpu()
    if count == 0:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, 4)
    if not torch.isfinite(freq).all() or freq.sum() <= 0:
        freq = torch.ones_like(freq)
    labels = torch.multinomial(freq, count, replacement=True, generator=generator)
    mean = priors.wh_mean.detach().float().cpu()[labels]
    std = priors.wh_std.detach().float().cpu()[labels]
    wh = mean + std * torch.randn(count, 2, generator=generator)
    wh = torch.minimum(torch.maximum(wh, mean - 2 * std), mean + 2 * std).clamp(*SIZE_CLIP)
    centre = torch.rand(count, 2, generator=generator).clamp(*CENTRE_CLIP)
    return labels, clamp_to_image(torch.cat([centre, wh], dim=1))


def clamp_to_image(cxcywh: Tensor) -> Tensor:
    """Normalized (cx, cy, w, h) boxes cut to the image: corners clamped to [0, 1] (docs/method/icd.md#fake-instances).

    Without it a fake near the border sticks out of the image, so its scale bins and loc targets
    describe a box no feature can show."""
    half = cxcywh[:, 2:] / 2
    lo = (cxcywh[:, :2] - half).clamp(0.0, 1.0)
    hi = (cxcywh[:, :2] + half).clamp(0.0, 1.0)
    return torch.cat([(lo + hi) / 2, hi - lo], dim=1)


def _slots(lengths: list[int], offsets: list[int]) -> tuple[Tensor, Tensor]:
    """(image index, slot index) of `lengths[i]` consecutive slots starting at `offsets[i]` in image i."""
    img = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths, dtype=torch.long))
    starts = torch.tensor(offsets, dtype=torch.long)[img]
    first = torch.cumsum(torch.tensor([0, *lengths[:-1]], dtype=torch.long), 0)[img]
    return img, starts + torch.arange(int(sum(lengths))) - first


def _one_hot(index: Tensor, classes: int) -> Tensor:
    """Float one-hot via scatter (F.one_hot validates the range, which syncs on a GPU)."""
    return torch.zeros(*index.shape, classes, device=index.device).scatter_(-1, index[..., None], 1.0)


def build_queries(
    targets: list[dict[str, Tensor]],
    image_sizes: list[tuple[int, int]],
    priors: ClassPriorTensors,
    num_classes: int,
    neg_per_pos: float,
    max_queries: int,
    jitter: float,
    generator: torch.Generator,
) -> InstanceQueries:
    """Real queries first, then fakes, then padding, per image; descriptors built without gradient.

    All random draws come from `generator` (CPU) in a fixed order, so a step's queries depend only on
    the generator's seed and the targets.
    """
    device = targets[0]["boxes"].device if targets else priors.freq.device
    n = len(targets)
    n_real = [int(t["labels"].numel()) for t in targets]
    counts = [query_count(r, neg_per_pos, max_queries) for r in n_real]
    k_max = max(counts) if counts else 1
    n_fake_total = sum(c - r for c, r in zip(counts, n_real))
    fake_labels, fake_boxes = sample_fakes(n_fake_total, priors, generator)
    u = (torch.rand(n, k_max, 2, generator=generator) * 2 - 1) * jitter

    # Slot indices come from host-side counts, so filling the batch needs no device sync.
    real_img, real_slot = _slots(n_real, [0] * n)
    fake_img, fake_slot = _slots([c - r for c, r in zip(counts, n_real)], n_real)
    with torch.no_grad():
        slot = torch.arange(k_max)
        real = (slot[None] < torch.tensor(n_real)[:, None]).to(device)
        valid = (slot[None] < torch.tensor(counts)[:, None]).to(device)
        labels = torch.zeros(n, k_max, dtype=torch.long, device=device)
        boxes = torch.tensor([0.5, 0.5, 0.1, 0.1], device=device).repeat(n, k_max, 1)
        wh_img = torch.tensor(image_sizes, dtype=torch.float32).reshape(n, 2).flip(-1).to(device)  # (w, h)
        if real_img.numel():
            ri, rs = real_img.to(device), real_slot.to(device)
            gt = torch.cat([t["boxes"] for t in targets]).float().to(device) / wh_img[ri].repeat(1, 2)
            boxes[ri, rs] = torch.cat([(gt[:, :2] + gt[:, 2:]) / 2, gt[:, 2:] - gt[:, :2]], dim=1)
            labels[ri, rs] = torch.cat([t["labels"] for t in targets]).to(device).long()
        if fake_img.numel():
            fi, fs = fake_img.to(device), fake_slot.to(device)
            boxes[fi, fs] = fake_boxes.to(device)
            labels[fi, fs] = fake_labels.to(device)
        ref = boxes[..., :2] + u.to(device) * boxes[..., 2:]
        size_px = boxes[..., 2:] * wh_img[:, None, :]  # each image's own pixels (docs/method/icd.md#release-defects, 2)
        desc = torch.cat(
            [
                _one_hot(labels, num_classes),
                coordinate_encoding(ref[..., 0]),
                coordinate_encoding(ref[..., 1]),
                _one_hot(scale_bin(size_px[..., 0]), NUM_SCALE_BINS),
                _one_hot(scale_bin(size_px[..., 1]), NUM_SCALE_BINS),
            ],
            dim=-1,
        )
        desc = desc * valid[..., None]
    return InstanceQueries(desc, valid, real, ref, boxes, labels)


class InstanceEncoder(nn.Module):
    """MLP descriptor → C → C → C (ReLU between layers): the query embedding."""

    def __init__(self, in_dims: int, channels: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dims, channels),
            nn.ReLU(inplace=True),
            nn.Linear(channels, channels),
            nn.ReLU(inplace=True),
            nn.Linear(channels, channels),
        )

    def forward(self, descriptors: Tensor) -> Tensor:
        return self.mlp(descriptors)
