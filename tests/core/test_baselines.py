"""The four KD baselines: zero loss on identical features, positive otherwise, hand-computed values,
and gradients only into the student's features and each method's own modules."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from icd_core.distill.base import DistillBatch, Distiller
from icd_core.distill.defeat import DeFeatDistiller
from icd_core.distill.fgd import FGDDistiller, attention
from icd_core.distill.fgfi import FGFIDistiller
from icd_core.distill.fitnet import FitNetDistiller
from icd_core.distill.masks import fgd_masks, virtual_anchors
from icd_core.spec import DistillSpec, ModelSpec

LEVELS = ["p3", "p4"]
PADDED = (64, 64)
METHODS = {"fitnet": FitNetDistiller, "fgfi": FGFIDistiller, "defeat": DeFeatDistiller, "fgd": FGDDistiller}


class StandIn(nn.Module):
    """What a distiller reads from a Detector (spec, channels, level_names), plus a parameter that must stay out."""

    def __init__(self, channels: int, detector: str = "retinanet", levels: list[str] | None = None) -> None:
        super().__init__()
        # Distillers read the width from `.channels`; the spec only carries detector, levels and anchors.
        self.spec = ModelSpec(detector=detector, backbone="resnet18", levels=levels or LEVELS)
        self.channels = channels
        self.level_names = self.spec.resolved_levels
        self.weight = nn.Parameter(torch.ones(1))


def make(method: str, c_s: int = 16, c_t: int = 16, detector: str = "retinanet", **spec) -> Distiller:
    torch.manual_seed(0)
    dspec = DistillSpec(method=method, **spec)
    return METHODS[method](dspec, StandIn(c_t, detector), StandIn(c_s, detector), total_steps=10)


def features(channels: int, seed: int = 0, nonneg: bool = False) -> OrderedDict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = OrderedDict()
    for lv, size in zip(LEVELS, (8, 4)):
        x = torch.randn(2, channels, size, size, generator=g)
        out[lv] = x.abs() if nonneg else x
    return out


TARGETS = [
    {"boxes": torch.tensor([[4.0, 4.0, 30.0, 36.0], [40.0, 8.0, 60.0, 20.0]]), "labels": torch.tensor([0, 1])},
    {"boxes": torch.tensor([[10.0, 30.0, 50.0, 62.0]]), "labels": torch.tensor([2])},
]


def batch(student: OrderedDict, teacher: OrderedDict, **kw) -> DistillBatch:
    return DistillBatch(student, teacher, TARGETS, image_sizes=[(64, 60), (56, 64)], padded_size=PADDED, step=0, **kw)


def set_identity(distiller: Distiller) -> None:
    """Make every adapter the identity map (1x1 or the centre tap of a 3x3)."""
    with torch.no_grad():
        for module in distiller.adapters.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.zero_()
                k = module.kernel_size[0] // 2
                module.weight[:, :, k, k] = torch.eye(module.out_channels, module.in_channels)
                module.bias.zero_()


def total(losses: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(losses.values())


@pytest.mark.parametrize("method", list(METHODS))
def test_zero_for_identical_features_positive_otherwise(method: str) -> None:
    distiller = make(method)
    set_identity(distiller)
    feats = features(16, nonneg=True)  # fgfi's adapter ends in a ReLU
    same = distiller.losses(batch(feats, OrderedDict((k, v.clone()) for k, v in feats.items())))
    assert all(k.startswith(f"loss_{method}") for k in same)
    assert total(same).item() == pytest.approx(0.0, abs=1e-7)
    other = distiller.losses(batch(feats, features(16, seed=1, nonneg=True)))
    assert total(other).item() > 0
    assert all(v.item() > 0 for v in other.values()), other


@pytest.mark.parametrize("method", list(METHODS))
def test_gradients_reach_only_student_and_own_modules(method: str) -> None:
    teacher_det, student_det = StandIn(32), StandIn(16)
    distiller = METHODS[method](DistillSpec(method=method), teacher_det, student_det, total_steps=10)
    assert not ({id(p) for p in distiller.parameters()} & {id(p) for p in [teacher_det.weight, student_det.weight]})
    assert "weight" not in dict(distiller.named_parameters())
    student = OrderedDict((k, v.requires_grad_()) for k, v in features(16).items())
    teacher = OrderedDict((k, v.requires_grad_()) for k, v in features(32, seed=1).items())
    total(distiller.losses(batch(student, teacher))).backward()
    for lv in LEVELS:
        assert student[lv].grad is not None and teacher[lv].grad is None
    # FGFI's mask may leave a level empty (here p4: no anchor there beats psi·max), hence zero grad on it.
    reached = [student[lv].grad.abs().sum().item() > 0 for lv in LEVELS]
    assert all(reached) if method != "fgfi" else any(reached)
    params = dict(distiller.named_parameters())
    assert params, "every baseline here has an adapter (C_s != C_t)"
    assert all(p.grad is not None for p in params.values()), [n for n, p in params.items() if p.grad is None]
    assert teacher_det.weight.grad is None and student_det.weight.grad is None


def test_fitnet_value_and_weight() -> None:
    distiller = make("fitnet")
    set_identity(distiller)
    feats = features(16)
    shifted = OrderedDict((k, v + 1.0) for k, v in feats.items())
    assert distiller.losses(batch(feats, shifted))["loss_fitnet"].item() == pytest.approx(2.0)  # 1 per level
    heavy = make("fitnet", weight=3.0)
    set_identity(heavy)
    assert heavy.losses(batch(feats, shifted))["loss_fitnet"].item() == pytest.approx(6.0)


def test_fgfi_value_uses_global_positive_count() -> None:
    distiller = make("fgfi")
    set_identity(distiller)
    feats = features(16, nonneg=True)
    shifted = OrderedDict((k, v + 1.0) for k, v in feats.items())
    b = batch(feats, shifted)
    masks = distiller.masks(b)
    assert masks[0].shape == (2, 8, 8) and masks[1].shape == (2, 4, 4) and masks[0].any()
    # D = 1 on every channel: Σ I·C / (2·N_p) = C / 2, times λ = 0.01.
    assert distiller.losses(b)["loss_fgfi"].item() == pytest.approx(0.01 * 16 / 2)
    assert 0 < distiller.report()["fgfi_mask_fraction"] < 1


def test_fgfi_uses_the_detectors_anchors_when_given() -> None:
    distiller = make("fgfi", options={"psi": 0.99})
    grids = [(8, 8), (4, 4)]
    anchors, per_level = virtual_anchors(PADDED, grids, [(16.0,), (32.0,)], ratios=(1.0,))
    # Each image's GT equals one anchor: (y=3, x=5) on p3 in image 0, (y=1, x=2) on p4 in image 1.
    b = batch(features(16), features(16, seed=1), anchors=[anchors, anchors], anchors_per_level=per_level)
    b.targets = [
        {"boxes": torch.tensor([[32.0, 16.0, 48.0, 32.0]]), "labels": torch.tensor([0])},
        {"boxes": torch.tensor([[16.0, 0.0, 48.0, 32.0]]), "labels": torch.tensor([0])},
    ]
    p3, p4 = distiller.masks(b)
    assert p3[0].nonzero().tolist() == [[3, 5]] and not p4[0].any()
    assert p4[1].nonzero().tolist() == [[1, 2]] and not p3[1].any()
    # FCOS ignores any anchors in the batch and builds virtual RetinaNet ones instead.
    fcos = make("fgfi", detector="fcos")
    virtual = fcos.masks(DistillBatch(b.student_features, b.teacher_features, b.targets, b.image_sizes, PADDED, 0))
    assert all(torch.equal(x, y) for x, y in zip(fcos.masks(b), virtual))


def test_defeat_value_fg_bg_normalization() -> None:
    distiller = make("defeat", options={"canonical_size": 16.0})
    set_identity(distiller)
    feats = features(16)
    shifted = OrderedDict((k, v + 1.0) for k, v in feats.items())
    b = batch(feats, shifted)
    masks = distiller.masks(b)
    assert masks[0].any() and masks[1].any()  # boxes of ~20-40 px reach both levels at canonical 16
    losses = distiller.losses(b)
    # D = 1: fg_l = bg_l = 1/2 on each level; averaged over levels, times w_fg = 4 and w_bg = 16.
    assert losses["loss_defeat_fg"].item() == pytest.approx(4 * 0.5)
    assert losses["loss_defeat_bg"].item() == pytest.approx(16 * 0.5)
    # With the default canonical size every box sits on p3: p4 has no foreground, fg averages 1/2 over 2 levels.
    default = make("defeat")
    set_identity(default)
    assert not default.masks(b)[1].any()
    assert default.losses(b)["loss_defeat_fg"].item() == pytest.approx(4 * 0.25)


def reference_fgd_level(s: torch.Tensor, t: torch.Tensor, boxes: list[torch.Tensor], temp: float) -> dict:
    """FGD's fg/bg/at terms written the reference code's way (sqrt-weighted features, MSE sum)."""
    n = s.shape[0]
    fg, bg = zip(*(fgd_masks(b, s.shape[-2:], PADDED) for b in boxes))
    fg, bg = torch.stack(fg)[:, None], torch.stack(bg)[:, None]
    s_s, c_s = attention(s, temp)
    s_t, c_t = attention(t, temp)
    scale = torch.sqrt(s_t[:, None]) * torch.sqrt(c_t[:, :, None, None])
    mse = nn.MSELoss(reduction="sum")
    return {
        "fg": mse(s * scale * torch.sqrt(fg), t * scale * torch.sqrt(fg)) / n,
        "bg": mse(s * scale * torch.sqrt(bg), t * scale * torch.sqrt(bg)) / n,
        "at": (torch.sum(torch.abs(c_s - c_t)) + torch.sum(torch.abs(s_s - s_t))) / n,
        "glb": mse(s, t) / n,  # GcBlocks start as the identity
    }


def test_fgd_matches_reference_formulas() -> None:
    distiller = make("fgd")
    s, t = features(16), features(16, seed=1)
    ours = {lv: distiller.level_losses(batch(s, t), lv) for lv in LEVELS}
    for lv in LEVELS:
        ref = reference_fgd_level(s[lv], t[lv], [x["boxes"] for x in TARGETS], 0.5)
        for name in ref:
            assert ours[lv][name].item() == pytest.approx(ref[name].item(), rel=1e-5)
    losses = distiller.losses(batch(s, t))
    coef = {"fg": 1e-3, "bg": 5e-4, "at": 5e-4, "glb": 5e-6}  # RetinaNet config
    for name, c in coef.items():
        expected = sum(ours[lv][name].item() for lv in LEVELS) * c
        assert losses[f"loss_fgd_{name}"].item() == pytest.approx(expected, rel=1e-5)


def test_fgd_defaults_options_levels_and_adapter() -> None:
    fcos = make("fgd", detector="fcos")
    assert (fcos.temperature, fcos.alpha, fcos.lam) == (0.8, 1.6e-3, 8e-6)
    tuned = make("fgd", options={"alpha": 2.0, "temperature": 1.0, "psi": 0.3})  # psi belongs to fgfi
    assert (tuned.alpha, tuned.temperature, tuned.beta) == (2.0, 1.0, 5e-4)
    with pytest.raises(ValueError, match="alhpa"):
        make("fgd", options={"alhpa": 2.0})
    assert len(make("fgd").adapters) == 0 and len(make("fgd", c_s=16, c_t=32).adapters) == 2
    levels = ["p2", "p3", "p4", "p5", "p6"]
    faster = FGDDistiller(
        DistillSpec(method="fgd"), StandIn(16, "faster_rcnn", levels), StandIn(16, "faster_rcnn", levels), total_steps=1
    )
    assert faster.levels == ["p2", "p3", "p4", "p5"] and faster.alpha == 5e-5


def test_fgd_teacher_gcblock_is_trained() -> None:
    distiller = make("fgd")
    s = OrderedDict((k, v.requires_grad_()) for k, v in features(16).items())
    total(distiller.losses(batch(s, features(16, seed=1)))).backward()
    for lv in LEVELS:
        assert distiller.teacher_gc[lv].transform[-1].weight.grad.abs().sum() > 0
        assert distiller.student_gc[lv].transform[-1].weight.grad.abs().sum() > 0


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core box, oversubscribed threads make this test 10x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_all_baselines_on_a_real_retinanet_step(one_thread: None) -> None:
    """The trainer's data flow on a tiny torchvision RetinaNet: the detector's anchors feed FGFI, and every
    method's loss backpropagates into the student's trunk without touching the teacher."""
    from icd_core.detectors import build_detector

    torch.manual_seed(0)
    spec = ModelSpec(detector="retinanet", backbone="resnet18", fpn_channels=16, levels=["p3", "p4", "p5"])
    student = build_detector(spec, 3, 64, 64)
    teacher = build_detector(spec.model_copy(update={"fpn_channels": 24}), 3, 64, 64).eval()
    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 64)]
    targets = [
        {"boxes": torch.tensor([[5.0, 5.0, 30.0, 40.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
    ]
    out = student.forward_train(images, targets)
    b = DistillBatch(
        out.features,
        teacher.teacher_features(out.image_list, student),
        out.targets,
        image_sizes=out.image_list.image_sizes,
        padded_size=tuple(out.image_list.tensors.shape[-2:]),
        step=0,
        anchors=out.anchors,
        anchors_per_level=out.anchors_per_level,
    )
    fgfi = FGFIDistiller(DistillSpec(method="fgfi"), teacher, student, total_steps=10)
    masks = fgfi.masks(b)
    assert masks[0][0].any() and not any(m[1].any() for m in masks)  # image 1 has no boxes
    losses = {}
    for name, cls in METHODS.items():
        losses.update(cls(DistillSpec(method=name), teacher, student, total_steps=10).losses(b))
    assert all(torch.isfinite(v) and v.item() > 0 for v in losses.values()), losses
    total(losses).backward()
    trunk = [p for p in student.model.backbone.parameters() if p.requires_grad]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trunk)
    assert all(p.grad is None for p in teacher.parameters())
