"""Is ICD's decoder ready? Diagnostics that tell the truth (docs/method/icd.md#readiness-diagnostics).

Accuracy at threshold 0 stays at the fake share (5/6 at ρ = 5) long after the decoder has learned,
and attention entropy can collapse onto a few keys that every query shares. What does show readiness:
- identification AUC: does the real/fake logit rank real queries above fakes (0.5 = chance)?
- real-query recall: the share of real queries called real (logit > 0);
- in-box attention mass: the share of a real query's attention that falls on keys inside its own box,
  against the share a uniform attention would put there (the box's share of the valid keys);
- localization error: the aux head's mean |edge error| in units of the box's width / height.

Every function works on device tensors without a host sync and returns sums + counts where a mean
over a batch is wanted, so callers can pool several batches exactly.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def identification_auc(logits: Tensor, real: Tensor, valid: Tensor) -> Tensor:
    """Mann-Whitney AUC of real over fake queries (ties count half); NaN when either class is absent.

    logits, real, valid: [N, K] (or any same shape). Ranks are averaged over ties, so the result equals
    P(logit_real > logit_fake) + ½ P(equal) exactly.
    """
    v = valid.reshape(-1)
    x = logits.reshape(-1).float()[v]
    r = real.reshape(-1)[v]
    n = x.numel()
    if n == 0:
        return torch.tensor(math.nan, device=logits.device)
    order = torch.argsort(x)
    sorted_x = x[order]
    ranks = torch.empty(n, device=x.device)
    ranks[order] = torch.arange(1, n + 1, device=x.device, dtype=torch.float32)
    # average rank of each tie group: mean of the ranks that share a value
    _, inverse, counts = torch.unique_consecutive(sorted_x, return_inverse=True, return_counts=True)
    group_sum = torch.zeros(counts.numel(), device=x.device).index_add_(0, inverse, ranks[order])
    ranks[order] = (group_sum / counts)[inverse]
    n_pos = r.sum().float()
    n_neg = n - n_pos
    u = ranks[r].sum() - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)  # 0/0 → NaN when one class is missing


def real_recall(logits: Tensor, real: Tensor, threshold: float = 0.0) -> tuple[Tensor, Tensor]:
    """(number of real queries with logit > threshold, number of real queries)."""
    realf = real.float()
    return ((logits.float() > threshold).float() * realf).sum(), realf.sum()


def key_centres(
    image_sizes: list[tuple[int, int]],
    padded_size: tuple[int, int],
    shapes: list[tuple[int, int]],
    device: torch.device | str = "cpu",
) -> Tensor:
    """[N, S, 2] (x, y) centre of every flattened key cell, normalized by each image's own (w, h)."""
    sizes = torch.tensor(image_sizes, dtype=torch.float32, device=device).reshape(-1, 2)  # (h, w)
    per_level = []
    for h, w in shapes:
        sy, sx = padded_size[0] / h, padded_size[1] / w
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) * sy
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) * sx
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        per_level.append(torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=-1))
    pixels = torch.cat(per_level, dim=0)  # [S, 2]
    return pixels[None] / sizes.flip(-1)[:, None, :]


def inside_boxes(centres: Tensor, boxes: Tensor) -> Tensor:
    """[N, K, S] bool: key s lies inside query k's (cx, cy, w, h) box. centres [N, S, 2], boxes [N, K, 4]."""
    lo = (boxes[..., :2] - boxes[..., 2:] / 2)[:, :, None, :]
    hi = (boxes[..., :2] + boxes[..., 2:] / 2)[:, :, None, :]
    c = centres[:, None, :, :]
    return ((c >= lo) & (c <= hi)).all(-1)


@torch.no_grad()
def in_box_mass(
    q: Tensor,
    k: Tensor,
    key_valid: Tensor,
    real: Tensor,
    inside: Tensor,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """(Σ attention mass inside the own box, Σ uniform share of the box, number of real query-heads).

    q [N, h, K, d], k [N, h, S, d], key_valid [N, S], real [N, K], inside [N, K, S]. The mass of one
    (query, head) is Σ_{s in box} softmax_s(q·k / √d / τ); its uniform reference is
    |valid keys in box| / |valid keys|. Only the real queries' slots are visited.
    """
    d = q.shape[-1]
    inside = inside & key_valid[:, None, :]
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) / (math.sqrt(d) * temperature)
    logits = logits.masked_fill(~key_valid[:, None, None, :], -1e30)
    p = logits.softmax(-1)  # [N, h, K, S]
    insidef = inside.float()
    mass = (p * insidef[:, None]).sum(-1)  # [N, h, K]
    uniform = insidef.sum(-1) / key_valid.float().sum(-1, keepdim=True).clamp(min=1)  # [N, K]
    realf = real.float()
    heads = q.shape[1]
    return (mass * realf[:, None]).sum(), (uniform * realf).sum() * heads, realf.sum() * heads


def localization_error(edge_logits: Tensor, ltrb: Tensor, boxes: Tensor, real: Tensor) -> tuple[Tensor, Tensor]:
    """(Σ over real queries of the mean |edge error| in box units, number of real queries).

    edge_logits [N, K, 4] (before the sigmoid), ltrb [N, K, 4] the true distances from the reference
    point to the left, top, right, bottom edges, boxes [N, K, 4] (cx, cy, w, h), all normalized.
    """
    err = (edge_logits.float().sigmoid() - ltrb).abs()
    w = boxes[..., 2].clamp(min=1e-6)
    h = boxes[..., 3].clamp(min=1e-6)
    per_query = (err[..., 0] / w + err[..., 1] / h + err[..., 2] / w + err[..., 3] / h) / 4
    realf = real.float()
    return (per_query * realf).sum(), realf.sum()


def edge_distances(ref_points: Tensor, boxes: Tensor) -> Tensor:
    """(l, t, r, b) distances from each reference point to its box's edges: the aux head's targets."""
    px, py = ref_points.unbind(-1)
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([px - (cx - w / 2), py - (cy - h / 2), (cx + w / 2) - px, (cy + h / 2) - py], dim=-1)
