"""ICD keys and conditional decoder (docs/method/icd.md#keys, #conditional-decoder, #auxiliary-task, #cost).

The teacher's FPN levels are flattened into one key sequence with a padding mask and a 2-D sine
position encoding; instance queries cross-attend to it. The auxiliary task's attention uses PyTorch's
fused scaled-dot-product attention (flash / memory-efficient kernels: the [N, heads, K, S] logits are
never stored for backward), and the distillation weights are accumulated over query chunks without
gradient, so peak memory grows with one chunk, not with K.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def flatten_levels(features: OrderedDict[str, Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
    """[N,C,H,W] per level → [N, S, C] (row-major, levels in order) and each level's (H, W)."""
    shapes = [(f.shape[-2], f.shape[-1]) for f in features.values()]
    flat = torch.cat([f.flatten(2).transpose(1, 2) for f in features.values()], dim=1)  # contiguous [N,S,C]
    return flat, shapes


def level_valid_masks(
    image_sizes: list[tuple[int, int]],
    padded_size: tuple[int, int],
    shapes: list[tuple[int, int]],
    device: torch.device,
) -> list[Tensor]:
    """Per level a [N, H, W] bool mask of positions inside each image: ceil(h / stride) × ceil(w / stride)."""
    sizes = torch.tensor(image_sizes, dtype=torch.float64, device=device).reshape(-1, 2)
    masks = []
    for h, w in shapes:
        stride_y, stride_x = padded_size[0] / h, padded_size[1] / w
        vh = torch.ceil(sizes[:, 0] / stride_y - 1e-9).clamp(1, h).long()
        vw = torch.ceil(sizes[:, 1] / stride_x - 1e-9).clamp(1, w).long()
        rows = torch.arange(h, device=device)[None, :, None] < vh[:, None, None]
        cols = torch.arange(w, device=device)[None, None, :] < vw[:, None, None]
        masks.append(rows & cols)
    return masks


def sine_position_encoding(valid: Tensor, channels: int, temperature: float = 10000.0) -> Tensor:
    """DETR's normalized 2-D sine encoding over the valid region: [N,H,W] → [N,H,W,channels].

    y and x are the cumulative counts of valid positions divided by the last one, times 2π; the
    first channels/2 encode y, the rest x, each interleaving sin/cos at 10000^(−2k/(channels/2)).
    """
    not_pad = valid.float()
    y = not_pad.cumsum(1)
    x = not_pad.cumsum(2)
    y = y / y[:, -1:, :].clamp(min=1.0) * (2 * math.pi)
    x = x / x[:, :, -1:].clamp(min=1.0) * (2 * math.pi)
    per_axis = channels // 2
    k = torch.arange(per_axis, device=valid.device, dtype=torch.float32)
    dim_t = temperature ** (2 * torch.div(k, 2, rounding_mode="floor") / per_axis)
    pos_y = y[..., None] / dim_t
    pos_x = x[..., None] / dim_t
    pos_y = torch.stack([pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()], dim=4).flatten(3)
    pos_x = torch.stack([pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()], dim=4).flatten(3)
    return torch.cat([pos_y, pos_x], dim=3)


@dataclass
class KeyLayout:
    """What depends only on the batch geometry: key validity [N, S] and position encoding [N, S, C]."""

    valid: Tensor
    pos: Tensor


def key_layout(
    image_sizes: list[tuple[int, int]],
    padded_size: tuple[int, int],
    shapes: list[tuple[int, int]],
    channels: int,
    device: torch.device,
) -> KeyLayout:
    masks = level_valid_masks(image_sizes, padded_size, shapes, device)
    valid = torch.cat([m.flatten(1) for m in masks], dim=1)
    pos = torch.cat([sine_position_encoding(m, channels).flatten(1, 2) for m in masks], dim=1)
    return KeyLayout(valid, pos)


def release_attention_init(q_proj: nn.Linear, k_proj: nn.Linear, v_proj: nn.Linear, out_proj: nn.Linear) -> None:
    """The release's `nn.MultiheadAttention` init (docs/method/icd.md#initialisation): Xavier on the *stacked* [3C, C]
    in-projection (bound √(6 / 4C), not √(6 / 2C) per projection), zero in-projection and out-projection
    biases; the out-projection weight keeps nn.Linear's default."""
    stacked = torch.empty(3 * q_proj.out_features, q_proj.in_features)
    nn.init.xavier_uniform_(stacked)
    with torch.no_grad():
        for proj, rows in zip((q_proj, k_proj, v_proj), stacked.chunk(3), strict=True):
            proj.weight.copy_(rows)
            nn.init.zeros_(proj.bias)
        nn.init.zeros_(out_proj.bias)


@dataclass
class Projections:
    """One layer's per-head projections [N, heads, len, head_dim]; ICD reads the last layer's."""

    q: Tensor
    k: Tensor
    v: Tensor


class DecoderLayer(nn.Module):
    """Post-norm cross-attention layer: g = LN(q + MHA(q,k,v)); g = LN(g + FFN(g)). No self-attention."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        if channels % heads:
            raise ValueError(f"ICD heads ({heads}) must divide the FPN channels ({channels})")
        self.heads = heads
        self.q_proj = nn.Linear(channels, channels)
        self.k_proj = nn.Linear(channels, channels)
        self.v_proj = nn.Linear(channels, channels)
        self.out_proj = nn.Linear(channels, channels)
        self.norm1 = nn.LayerNorm(channels)
        self.ffn = nn.Sequential(
            nn.Linear(channels, 4 * channels), nn.ReLU(inplace=True), nn.Linear(4 * channels, channels)
        )
        self.norm2 = nn.LayerNorm(channels)
        release_attention_init(self.q_proj, self.k_proj, self.v_proj, self.out_proj)  # FFN keeps the default

    def split(self, x: Tensor) -> Tensor:
        n, length, c = x.shape
        return x.view(n, length, self.heads, c // self.heads).transpose(1, 2).contiguous()

    def forward(self, q: Tensor, keys: Tensor, values: Tensor, key_valid: Tensor) -> tuple[Tensor, Projections]:
        proj = Projections(self.split(self.q_proj(q)), self.split(self.k_proj(keys)), self.split(self.v_proj(values)))
        mask = key_valid[:, None, None, :]
        attn = F.scaled_dot_product_attention(proj.q, proj.k, proj.v, attn_mask=mask)
        attn = attn.transpose(1, 2).flatten(2)
        g = self.norm1(q + self.out_proj(attn))
        g = self.norm2(g + self.ffn(g))
        return g, proj


class ConditionalDecoder(nn.Module):
    """Keys = features + Linear(PE); values = features. Stacked layers; the last one's projections are kept."""

    def __init__(self, channels: int, heads: int, layers: int = 1):
        super().__init__()
        self.pos_proj = nn.Linear(channels, channels)
        self.layers = nn.ModuleList(DecoderLayer(channels, heads) for _ in range(layers))  # pos_proj: default init

    def forward(self, queries: Tensor, features: Tensor, pos: Tensor, key_valid: Tensor) -> tuple[Tensor, Projections]:
        keys = features + self.pos_proj(pos)
        g = queries
        proj = None
        for layer in self.layers:
            g, proj = layer(g, keys, features, key_valid)
        assert proj is not None
        return g, proj


@torch.no_grad()
def instance_weights(
    q: Tensor,
    k: Tensor,
    key_valid: Tensor,
    real: Tensor,
    temperature: float = 1.0,
    chunk: int = 64,
    max_real: int | None = None,
) -> tuple[Tensor, Tensor]:
    """w[n,h,s] = Σ_{real i} softmax_s(q_i·k_s / √d / τ), built chunk by chunk over queries.

    q [N,h,K,d], k [N,h,S,d], key_valid [N,S], real [N,K]. Real queries sit in the leading slots, so
    only the first `max_real` slots are visited. Returns (w [N,h,S] float32, summed attention entropy
    of the real queries [N,h]); only one [N,h,chunk,S] block exists at a time.
    """
    n, heads, kq, d = q.shape
    s = k.shape[2]
    if max_real is None:
        any_real = real.any(0).nonzero()
        max_real = int(any_real.max()) + 1 if any_real.numel() else 0
    scale = 1.0 / (math.sqrt(d) * temperature)
    w = torch.zeros(n, heads, 1, s, dtype=torch.float32, device=q.device)
    entropy = torch.zeros(n, heads, dtype=torch.float32, device=q.device)
    kt = k.float().transpose(-1, -2)
    pad = ~key_valid[:, None, None, :]
    realf = real.float()
    visit = min(max_real, kq)
    for start in range(0, visit, chunk):
        stop = min(start + chunk, visit)
        sel = realf[:, start:stop]
        logp = torch.matmul(q[:, :, start:stop].float(), kt).mul_(scale)
        logp.masked_fill_(pad, -1e30)  # finite, so p·log p is 0 (not NaN) on padded keys
        logp -= torch.logsumexp(logp, dim=-1, keepdim=True)
        p = logp.exp()  # the only other [N, h, chunk, S] buffer
        w += torch.matmul(sel[:, None, None, :], p)
        ent = -torch.matmul(p.unsqueeze(-2), logp.unsqueeze(-1)).flatten(2)  # [N, h, chunk], no temporaries
        entropy += (ent * sel[:, None, :]).sum(-1)
    return w.squeeze(2), entropy


class AuxHead(nn.Module):
    """MLP C → C → C → 5 on the decoder output: z0 = real/fake logit, z1..4 = (l, t, r, b) edge logits."""

    def __init__(self, channels: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(channels, channels),
            nn.ReLU(inplace=True),
            nn.Linear(channels, channels),
            nn.ReLU(inplace=True),
            nn.Linear(channels, 5),
        )

    def forward(self, g: Tensor) -> Tensor:
        return self.mlp(g)
