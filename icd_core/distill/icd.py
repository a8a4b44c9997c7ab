"""Instance-Conditional Knowledge Distillation (Kang et al., NeurIPS 2021), as docs/method/icd.md states it.

Ground-truth instances (plus sampled fakes) query the teacher's FPN through a small decoder trained
by an auxiliary real/fake + edge task; the teacher's per-instance attention, summed over real
instances, weights a per-head LayerNorm'd MSE between adapted student and teacher values.

Gradient flow, which lets the trainer sum every returned loss into one backward:
- `loss_icd_ident` / `loss_icd_loc` see only detached teacher features → encoder, decoder, aux head.
- `loss_icd_distill` uses attention weights and teacher values computed without gradient → only the
  student adapter and (after the bypass warm-up) the student's FPN receive its gradient.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from icd_core.distill.base import DistillBatch, Distiller
from icd_core.distill.icd_decoder import (
    AuxHead,
    ConditionalDecoder,
    KeyLayout,
    Projections,
    flatten_levels,
    instance_weights,
    key_layout,
)
from icd_core.distill.icd_diagnostics import (
    edge_distances,
    identification_auc,
    in_box_mass,
    inside_boxes,
    key_centres,
    localization_error,
    real_recall,
)
from icd_core.distill.icd_queries import (
    ClassPriorTensors,
    InstanceEncoder,
    InstanceQueries,
    build_queries,
    descriptor_dims,
)
from icd_core.spec import ICD_PAPER_WEIGHT, INT32_MAX

if TYPE_CHECKING:
    from icd_core.data.priors import ClassPriors
    from icd_core.detectors import Detector
    from icd_core.spec import DistillSpec

DEFAULT_WEIGHT = ICD_PAPER_WEIGHT
DEFAULT_MAX_QUERIES = {"retinanet": 300, "fcos": 300, "faster_rcnn": 100}
UNIFORM_WH_MEAN = 0.2  # fake box prior when no dataset statistics are given
UNIFORM_WH_STD = 0.1
PAPER_BYPASS_ITERS = 1000  # docs/method/icd.md#bypass


def bypass_steps(requested: int | None, total_steps: int) -> int:
    """Steps during which the student's features are detached (only the adapter learns).

    An explicit value is taken as given. Null means the paper's absolute 1,000 iterations, because the
    bypass is the decoder's head start and the decoder learns per step, not per share of the schedule
    (scaling it to 600/90,000 of training gave 7 steps: no head start at all). When the schedule is
    shorter than 3,000 steps the bypass is capped at a third of it, so the student still receives the
    ICD gradient for two thirds of training, including all of it at full learning rate after the first
    third (the first LR drop comes at 2/3).
    """
    if requested is not None:
        return int(requested)
    return min(PAPER_BYPASS_ITERS, max(0, int(total_steps)) // 3)


def step_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator that depends only on (seed, step): reproducible runs and exact resume."""
    return torch.Generator().manual_seed(((int(seed) & 0x7FFFFFFF) << 32) | (int(step) & 0xFFFFFFFF))


class ICDOutputs:
    """Everything one ICD step computed; `losses` is what the trainer sees, the rest is for tests/logging."""

    def __init__(
        self,
        losses: dict[str, Tensor],
        weights: Tensor,
        queries: InstanceQueries,
        layout: KeyLayout,
        stats: dict[str, Tensor],
    ):
        self.losses = losses
        self.weights = weights  # [N, heads, S]
        self.queries = queries
        self.layout = layout
        self.stats = stats


class ICDDistiller(Distiller):
    """ICD: instance encoder + conditional decoder + aux head (own AdamW) and the student adapter."""

    method = "icd"

    def __init__(
        self,
        dspec: DistillSpec,
        teacher: Detector,
        student: Detector,
        total_steps: int,
        priors: ClassPriors | None = None,
        seed: int | None = None,
    ):
        super().__init__()
        opts = dspec.icd
        detector = student.spec.detector
        # The decoder works in the teacher's feature space; the adapter maps the student's FPN width onto it,
        # so a narrower (cheaper) student neck can learn from a wider teacher's.
        channels = int(getattr(teacher, "channels", student.channels))
        self.student_channels = int(student.channels)
        if channels % opts.heads:
            raise ValueError(f"distill.icd.heads ({opts.heads}) must divide the teacher's FPN channels ({channels})")
        self.opts = opts
        self.detector = detector
        self.num_classes = int(student.num_classes)
        self.channels = channels
        self.heads = opts.heads
        self.total_steps = int(total_steps)
        self.weight = float(dspec.weight) if dspec.weight is not None else DEFAULT_WEIGHT[detector]
        self.max_queries = opts.max_queries or DEFAULT_MAX_QUERIES[detector]
        self.bypass_iters = bypass_steps(opts.bypass_iters, self.total_steps)

        self.encoder = InstanceEncoder(descriptor_dims(self.num_classes), channels)
        self.decoder = ConditionalDecoder(channels, opts.heads, opts.layers)
        self.aux_head = AuxHead(channels)
        # the adapter (docs/method/icd.md#conditional-decoder)
        self.adapter = nn.Linear(self.student_channels, channels)
        nn.init.xavier_uniform_(self.adapter.weight)
        nn.init.zeros_(self.adapter.bias)

        freq, mean, std = self._prior_tensors(priors)
        self.register_buffer("prior_freq", freq, persistent=False)
        self.register_buffer("prior_wh_mean", mean, persistent=False)
        self.register_buffer("prior_wh_std", std, persistent=False)
        if seed is None:  # drawn from the (seeded) global RNG; kept in state_dict for exact resume
            seed = int(torch.randint(0, INT32_MAX, (1,)).item())
        self.sample_seed = int(seed)  # saved as the module's extra state
        self._layout_key: tuple | None = None
        self._layout: KeyLayout | None = None
        self._stats: dict[str, Tensor] = {}

    def _prior_tensors(self, priors: ClassPriors | None) -> tuple[Tensor, Tensor, Tensor]:
        c = self.num_classes
        if priors is None:
            return torch.full((c,), 1.0 / c), torch.full((c, 2), UNIFORM_WH_MEAN), torch.full((c, 2), UNIFORM_WH_STD)
        freq = priors.freq.detach().float().cpu().reshape(-1)
        if freq.numel() != c:
            raise ValueError(f"class priors cover {freq.numel()} classes but the student has {c}")
        mean = priors.wh_mean.detach().float().cpu().reshape(c, 2)
        return freq, mean, priors.wh_std.detach().float().cpu().reshape(c, 2)

    def get_extra_state(self) -> dict:
        return {"sample_seed": self.sample_seed}

    def set_extra_state(self, state: dict) -> None:
        self.sample_seed = int(state["sample_seed"])

    # --- per step ------------------------------------------------------------------------------
    def _key_layout(self, batch: DistillBatch, shapes: list[tuple[int, int]], device: torch.device) -> KeyLayout:
        """The padding mask and position encoding; reused while the batch geometry repeats."""
        key = (tuple(map(tuple, batch.image_sizes)), tuple(batch.padded_size), tuple(shapes), str(device))
        if key != self._layout_key:
            self._layout = key_layout(batch.image_sizes, batch.padded_size, shapes, self.channels, device)
            self._layout_key = key
        assert self._layout is not None
        return self._layout

    def queries_for(self, batch: DistillBatch) -> InstanceQueries:
        gen = step_generator(self.sample_seed, batch.step)
        priors = ClassPriorTensors(self.prior_freq, self.prior_wh_mean, self.prior_wh_std)
        return build_queries(
            batch.targets,
            batch.image_sizes,
            priors,
            self.num_classes,
            self.opts.neg_per_pos,
            self.max_queries,
            self.opts.jitter,
            gen,
        )

    def aux_step(self, batch: DistillBatch) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The decoder side alone on teacher features (no student): aux losses and readiness diagnostics.

        What pre-training (docs/method/icd.md#decoder-pre-training) optimizes; `batch.student_features` is not read.
        """
        teacher, shapes = flatten_levels(batch.teacher_features)
        teacher = teacher.detach().float()
        layout = self._key_layout(batch, shapes, teacher.device)
        queries = self.queries_for(batch)
        g, proj = self.decoder(self.encoder(queries.descriptors), teacher, layout.pos, layout.valid)
        z = self.aux_head(g).float()
        loss_ident, loss_loc, _ = self._aux_losses(z, queries)
        max_real = max((int(t["labels"].numel()) for t in batch.targets), default=0)
        stats = self.diagnostics(batch, shapes, layout, queries, z.detach(), proj, max_real)
        stats["icd_queries_real"] = queries.real.sum().float()
        stats["icd_logits"] = z[..., 0].detach()  # pooled AUC over several batches needs the raw scores
        stats["icd_real_mask"], stats["icd_valid_mask"] = queries.real, queries.valid
        return {"loss_icd_ident": loss_ident, "loss_icd_loc": loss_loc}, stats

    def decoder_parameters(self) -> list[nn.Parameter]:
        """What pre-training trains: instance encoder, decoder and aux head (not the student adapter)."""
        return [*self.encoder.parameters(), *self.decoder.parameters(), *self.aux_head.parameters()]

    def compute(self, batch: DistillBatch) -> ICDOutputs:
        """One ICD step: queries, decoder, aux losses, attention weights and the distillation loss."""
        teacher, shapes = flatten_levels(batch.teacher_features)
        teacher = teacher.detach().float()
        student, s_shapes = flatten_levels(batch.student_features)
        if s_shapes != shapes or student.shape[-1] != self.student_channels:
            raise ValueError(
                f"student features {s_shapes}x{student.shape[-1]} do not match the teacher's {shapes} "
                f"and the adapter's input width {self.student_channels}"
            )
        if batch.step < self.bypass_iters:
            student = student.detach()
        layout = self._key_layout(batch, shapes, teacher.device)
        queries = self.queries_for(batch)

        q = self.encoder(queries.descriptors)
        g, proj = self.decoder(q, teacher, layout.pos, layout.valid)
        z = self.aux_head(g).float()
        loss_ident, loss_loc, accuracy = self._aux_losses(z, queries)

        n_real = [int(t["labels"].numel()) for t in batch.targets]
        weights, entropy = instance_weights(
            proj.q.detach(),
            proj.k.detach(),
            layout.valid,
            queries.real,
            self.opts.temperature,
            self.opts.query_chunk,
            max_real=max(n_real, default=0),
        )
        loss_distill = self._distill_loss(student, proj.v.detach(), weights)

        num_real = queries.real.sum()
        stats = {
            "icd_ident_acc": accuracy,
            "icd_real_queries": num_real.float(),
            "icd_fake_queries": (queries.valid & ~queries.real).sum().float(),
            "icd_attn_entropy": entropy.sum() / (num_real * self.heads).clamp(min=1),
            **self.diagnostics(batch, shapes, layout, queries, z.detach(), proj, max(n_real, default=0)),
        }
        self._stats = {key: v.detach() for key, v in stats.items()}
        losses = {
            "loss_icd_distill": self.weight * loss_distill,
            "loss_icd_ident": loss_ident,
            "loss_icd_loc": loss_loc,
        }
        return ICDOutputs(losses, weights, queries, layout, stats)

    @torch.no_grad()
    def diagnostics(
        self,
        batch: DistillBatch,
        shapes: list[tuple[int, int]],
        layout: KeyLayout,
        queries: InstanceQueries,
        z: Tensor,
        proj: Projections,
        max_real: int,
    ) -> dict[str, Tensor]:
        """Readiness of the decoder on this batch, measured before this step's update (icd_diagnostics).

        icd_ident_auc, icd_real_recall (logit > 0), icd_inbox_mass and its uniform reference
        icd_inbox_uniform, icd_loc_error (mean |edge error| in box units). NaN when the batch has no real
        query (AUC also when it has no fake one).
        """
        real, boxes = queries.real[:, :max_real], queries.boxes[:, :max_real]
        centres = key_centres(batch.image_sizes, batch.padded_size, shapes, layout.valid.device)
        mass, uniform, pairs = in_box_mass(
            proj.q[:, :, :max_real], proj.k, layout.valid, real, inside_boxes(centres, boxes), self.opts.temperature
        )
        hits, n_real = real_recall(z[..., 0], queries.real)
        loc_sum, _ = localization_error(
            z[..., 1:5], edge_distances(queries.ref_points, queries.boxes), queries.boxes, queries.real
        )
        return {
            "icd_ident_auc": identification_auc(z[..., 0], queries.real, queries.valid),
            "icd_real_recall": hits / n_real,
            "icd_inbox_mass": mass / pairs,
            "icd_inbox_uniform": uniform / pairs,
            "icd_loc_error": loc_sum / n_real,
        }

    def losses(self, batch: DistillBatch) -> dict[str, Tensor]:
        return self.compute(batch).losses

    def _aux_losses(self, z: Tensor, queries: InstanceQueries) -> tuple[Tensor, Tensor, Tensor]:
        """BCE real/fake over all queries; L1 edge distances over real ones, per-axis normalized by box size."""
        validf, realf = queries.valid.float(), queries.real.float()  # masks, not indexing: no device sync
        count = validf.sum().clamp(min=1)
        bce = F.binary_cross_entropy_with_logits(z[..., 0], realf, reduction="none")
        loss_ident = (bce * validf).sum() / count
        accuracy = (((z[..., 0] > 0).float() == realf).float() * validf).sum().detach() / count

        px, py = queries.ref_points.unbind(-1)
        cx, cy, w, h = queries.boxes.unbind(-1)
        ltrb = torch.stack([px - (cx - w / 2), py - (cy - h / 2), (cx + w / 2) - px, (cy + h / 2) - py], dim=-1)
        err = (z[..., 1:5].sigmoid() - ltrb).abs()
        per_query = (err[..., 0] + err[..., 2]) / w.clamp(min=1e-6) + (err[..., 1] + err[..., 3]) / h.clamp(min=1e-6)
        loss_loc = (per_query * realf).sum() / realf.sum().clamp(min=1)
        return loss_ident, loss_loc, accuracy

    def _distill_loss(self, student: Tensor, teacher_v: Tensor, weights: Tensor) -> Tensor:
        """mean_{n,h,c} Σ_s w·(LN(S_v) − LN(T_v))² / max(Σ_s w, 1e-6); w and T_v carry no gradient.

        Works in the adapter's [N, S, heads, d] layout (no transposed copies of the big tensors): the
        weighted sum over s is one batched matmul [N,h,S]·[N,S,h·d] whose (head, head) diagonal blocks
        are the per-head sums.
        """
        n, s, c = student.shape[0], student.shape[1], self.channels
        d = c // self.heads
        s_v = F.layer_norm(self.adapter(student).float().view(n, s, self.heads, d), (d,))
        t_v = F.layer_norm(teacher_v.float(), (d,)).transpose(1, 2)  # [N, S, h, d] view
        sq = (s_v - t_v).pow(2).reshape(n, s, c)
        full = torch.bmm(weights, sq).view(n, self.heads, self.heads, d)
        num = torch.diagonal(full, dim1=1, dim2=2)  # [N, d, h]
        den = weights.sum(-1).clamp(min=1e-6)[:, None, :]  # [N, 1, h]
        return (num / den).mean()

    # --- optimisation --------------------------------------------------------------------------
    def make_optimizer(self, total_steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """AdamW over every ICD module (encoder, decoder, aux head, adapter), cosine decay to 0.

        With `adapter_lr` the adapter is a second parameter group (the first stays the decoder side, whose lr
        is logged as lr_distill); without it one group, as in the release, so older checkpoints resume.
        """
        total = max(1, int(total_steps))
        groups: list[dict] = [{"params": list(self.parameters())}]
        if self.opts.adapter_lr is not None:
            groups = [
                {"params": self.decoder_parameters()},
                {"params": list(self.adapter.parameters()), "lr": self.opts.adapter_lr},
            ]
        opt = torch.optim.AdamW(groups, lr=self.opts.lr, weight_decay=self.opts.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
        )
        return opt, sched

    def clip_gradients(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.parameters(), self.opts.grad_clip)

    def report(self) -> dict[str, float]:
        """The last step's stats; undefined ones (NaN: e.g. no real query in the batch) are left out."""
        values = {key: float(v) for key, v in self._stats.items()}
        return {key: v for key, v in values.items() if math.isfinite(v)}
