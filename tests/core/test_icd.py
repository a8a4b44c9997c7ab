"""ICD invariants (docs/method/icd.md) on tiny hand-built FPN features: no detector needed."""

from __future__ import annotations

import math
from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch

from icd_core.distill.base import DistillBatch
from icd_core.distill.icd import ICDDistiller, step_generator
from icd_core.distill.icd_decoder import instance_weights, key_layout, level_valid_masks, sine_position_encoding
from icd_core.distill.icd_queries import (
    ClassPriorTensors,
    build_queries,
    descriptor_dims,
    query_count,
    scale_bin,
)
from icd_core.spec import DistillSpec, ICDOptions, ModelSpec

C = 32
SHAPES = [(16, 16), (8, 8), (4, 4)]  # p3..p5 of a 128×128 padded batch
PADDED = (128, 128)


def fake_detector(detector: str = "retinanet", num_classes: int = 3) -> SimpleNamespace:
    return SimpleNamespace(num_classes=num_classes, channels=C, spec=ModelSpec(detector=detector, fpn_channels=C))


def make_distiller(**icd: object) -> ICDDistiller:
    torch.manual_seed(0)
    det = fake_detector()
    return ICDDistiller(DistillSpec(icd=ICDOptions(**icd)), det, det, total_steps=100, seed=123)


def features(seed: int, n: int = 2, grad: bool = False) -> OrderedDict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = OrderedDict()
    for i, (h, w) in enumerate(SHAPES):
        out[f"p{i + 3}"] = torch.randn(n, C, h, w, generator=g).requires_grad_(grad)
    return out


def target(boxes: list[list[float]], labels: list[int]) -> dict[str, torch.Tensor]:
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.long),
    }


EMPTY = target([], [])
TWO = target([[10, 10, 50, 60], [30, 40, 100, 90]], [0, 2])
ONE = target([[5, 5, 40, 30]], [1])


def batch(targets, sizes, step: int = 5000, student=None, teacher=None) -> DistillBatch:
    n = len(targets)
    return DistillBatch(
        student if student is not None else features(1, n, grad=True),
        teacher if teacher is not None else features(2, n),
        targets,
        sizes,
        PADDED,
        step,
    )


def test_weights_sum_to_real_count_per_image_and_head() -> None:
    d = make_distiller()
    out = d.compute(batch([TWO, EMPTY, ONE], [(128, 128), (100, 90), (96, 128)]))
    sums = out.weights.sum(-1)  # [N, heads]
    expected = torch.tensor([2.0, 0.0, 1.0])[:, None].expand_as(sums)
    torch.testing.assert_close(sums, expected, atol=1e-4, rtol=0)
    assert out.queries.real.sum(1).tolist() == [2, 0, 1]
    assert out.queries.valid.sum(1).tolist() == [query_count(r, 5.0, 300) for r in (2, 0, 1)] == [12, 1, 6]
    assert torch.isfinite(torch.stack(list(out.losses.values()))).all()


def test_padded_keys_get_zero_weight_and_valid_region_uses_ceil() -> None:
    d = make_distiller()
    out = d.compute(batch([TWO, ONE], [(128, 128), (100, 70)]))
    valid = out.layout.valid
    assert (out.weights.permute(0, 2, 1)[~valid] == 0).all()
    masks = level_valid_masks([(100, 70)], PADDED, SHAPES, torch.device("cpu"))
    # strides 8, 16, 32: ceil(100/8)=13 × ceil(70/8)=9, 7 × 5, 4 × 3
    assert [tuple(m[0].sum(dim=d).max().item() for d in (0, 1)) for m in masks] == [(13, 9), (7, 5), (4, 3)]


def test_fakes_never_count_as_real() -> None:
    torch.manual_seed(0)
    n, heads, k, s, dh = 2, 4, 7, 20, 8
    q, key = torch.randn(n, heads, k, dh), torch.randn(n, heads, s, dh)
    valid = torch.ones(n, s, dtype=torch.bool)
    real = torch.zeros(n, k, dtype=torch.bool)
    real[0, :3] = True
    real[1, :1] = True
    w, _ = instance_weights(q, key, valid, real, chunk=2)
    p = torch.softmax(q @ key.transpose(-1, -2) / math.sqrt(dh), dim=-1)
    torch.testing.assert_close(w[0], p[0, :, :3].sum(1))
    torch.testing.assert_close(w[1], p[1, :, :1].sum(1))

    d = make_distiller()
    queries = d.compute(batch([TWO, ONE], [(128, 128), (128, 128)])).queries
    assert queries.real[0].tolist()[:3] == [True, True, False] and queries.real[1, 1:].sum() == 0
    assert queries.labels[0, :2].tolist() == [0, 2] and queries.labels[1, 0].item() == 1


def test_chunked_weights_equal_unchunked() -> None:
    torch.manual_seed(1)
    q, key = torch.randn(2, 8, 37, 4), torch.randn(2, 8, 50, 4)
    valid = torch.rand(2, 50) > 0.3
    real = torch.rand(2, 37) > 0.5
    ref, ent_ref = instance_weights(q, key, valid, real, temperature=0.7, chunk=1000)
    for chunk in (1, 5, 16):
        w, ent = instance_weights(q, key, valid, real, temperature=0.7, chunk=chunk)
        torch.testing.assert_close(w, ref)
        torch.testing.assert_close(ent, ent_ref)


def test_loss_zero_for_identical_features_and_identity_projections() -> None:
    d = make_distiller()
    with torch.no_grad():
        d.adapter.weight.copy_(torch.eye(C))
        d.adapter.bias.zero_()
        d.decoder.layers[-1].v_proj.weight.copy_(torch.eye(C))
        d.decoder.layers[-1].v_proj.bias.zero_()
    feats = features(3)
    out = d.compute(batch([TWO, ONE], [(128, 128), (100, 90)], student=feats, teacher=feats))
    assert out.losses["loss_icd_distill"].item() == pytest.approx(0.0, abs=1e-6)

    # The same holds with a random adapter equal to the teacher value projection.
    d = make_distiller()
    with torch.no_grad():
        d.adapter.load_state_dict(d.decoder.layers[-1].v_proj.state_dict())
    one = features(4, 1)
    out = d.compute(batch([TWO], [(100, 128)], student=one, teacher=one))
    assert out.losses["loss_icd_distill"].item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("step, reaches", [(9, False), (10, True)])
def test_bypass_detaches_student_until_step(step: int, reaches: bool) -> None:
    d = make_distiller(bypass_iters=10)
    student = features(1, 2, grad=True)
    out = d.compute(batch([TWO, ONE], [(128, 128), (128, 128)], step=step, student=student))
    sum(out.losses.values()).backward()
    grads = [f.grad for f in student.values()]
    if reaches:
        assert all(g is not None and g.abs().sum() > 0 for g in grads)
    else:
        assert all(g is None for g in grads)
    assert d.adapter.weight.grad is not None and d.adapter.weight.grad.abs().sum() > 0


def test_gradient_routing() -> None:
    """Aux losses never reach the student or the adapter; the distill loss never reaches the decoder."""
    d = make_distiller(bypass_iters=0)
    student = features(1, 2, grad=True)
    out = d.compute(batch([TWO, ONE], [(128, 128), (128, 128)], student=student))
    aux = out.losses["loss_icd_ident"] + out.losses["loss_icd_loc"]
    aux.backward(retain_graph=True)
    assert all(f.grad is None for f in student.values())
    assert d.adapter.weight.grad is None
    assert d.decoder.layers[0].k_proj.weight.grad.abs().sum() > 0
    assert d.encoder.mlp[0].weight.grad.abs().sum() > 0
    d.zero_grad(set_to_none=True)
    out.losses["loss_icd_distill"].backward()
    decoder_grads = [p.grad for p in [*d.decoder.parameters(), *d.encoder.parameters(), *d.aux_head.parameters()]]
    assert all(g is None for g in decoder_grads)
    assert d.adapter.weight.grad.abs().sum() > 0


def test_images_and_batches_without_objects_run() -> None:
    d = make_distiller(bypass_iters=0)
    student = features(1, 2, grad=True)
    out = d.compute(batch([EMPTY, EMPTY], [(128, 128), (64, 100)], student=student))
    losses = out.losses
    assert losses["loss_icd_distill"].item() == 0.0
    assert losses["loss_icd_loc"].item() == 0.0
    assert torch.isfinite(losses["loss_icd_ident"])
    assert out.queries.valid.sum(1).tolist() == [1, 1]  # one fake query per empty image
    sum(losses.values()).backward()
    assert d.report()["icd_real_queries"] == 0.0


def test_key_position_encoding_matches_hand_computation() -> None:
    valid = torch.zeros(1, 3, 4, dtype=torch.bool)
    valid[0, :2, :3] = True  # a 2×3 image region inside a 3×4 padded map
    pe = sine_position_encoding(valid, channels=8)
    assert pe.shape == (1, 3, 4, 8)

    def expected(row: int, col: int) -> list[float]:
        y = (row + 1) / 2 * 2 * math.pi
        x = (col + 1) / 3 * 2 * math.pi
        # 4 channels per axis: frequencies 10000^(-2·floor(k/2)/4) = 1, 1, 1/100, 1/100; sin/cos interleaved
        return [
            math.sin(y),
            math.cos(y),
            math.sin(y / 100),
            math.cos(y / 100),
            math.sin(x),
            math.cos(x),
            math.sin(x / 100),
            math.cos(x / 100),
        ]

    for row, col in [(0, 0), (1, 2), (0, 1)]:
        torch.testing.assert_close(pe[0, row, col], torch.tensor(expected(row, col)), atol=1e-5, rtol=0)
    assert torch.isfinite(pe).all()  # padded columns (no valid row) stay finite

    layout = key_layout([(16, 24)], (32, 32), [(4, 4), (2, 2)], 8, torch.device("cpu"))
    assert layout.valid.shape == (1, 20) and layout.pos.shape == (1, 20, 8)
    assert layout.valid[0, :16].view(4, 4).sum().item() == 2 * 3


def test_scale_bins_match_spec_table() -> None:
    sizes = torch.tensor([1.0, 10, 64, 65, 129, 130, 258, 259, 517, 519, 2000])
    assert scale_bin(sizes).tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


@pytest.mark.parametrize(
    "n_real, rho, max_q, k",
    [
        (0, 5, 300, 1),
        (1, 5, 300, 6),
        (10, 5, 300, 60),
        (60, 5, 300, 300),
        (400, 5, 300, 400),
        (30, 5, 100, 100),
        (3, 0, 300, 3),
        (7, 0.5, 300, 10),
    ],
)
def test_query_count_formula(n_real: int, rho: float, max_q: int, k: int) -> None:
    assert query_count(n_real, rho, max_q) == k


def test_faster_rcnn_defaults() -> None:
    det = fake_detector("faster_rcnn")
    d = ICDDistiller(DistillSpec(), det, det, total_steps=10, seed=0)
    assert d.max_queries == 100 and d.weight == 3.0
    assert make_distiller().weight == 8.0 and make_distiller().max_queries == 300


def test_fake_sampling_uses_numeric_class_priors_and_clips() -> None:
    num_classes = 12
    freq = torch.zeros(num_classes)
    freq[10] = 1.0  # with string-sorted keys class '10' would sit at index 2
    mean = torch.full((num_classes, 2), 0.5)
    std = torch.full((num_classes, 2), 0.3)
    mean[10] = torch.tensor([0.05, 0.3])
    std[10] = torch.tensor([0.01, 0.5])
    priors = ClassPriorTensors(freq, mean, std)
    q = build_queries(
        [EMPTY] * 2 + [TWO], [(128, 128)] * 3, priors, num_classes, 50.0, 300, 0.3, torch.Generator().manual_seed(0)
    )
    fake = q.valid & ~q.real
    assert (q.labels[fake] == 10).all()
    w, h = q.boxes[fake][:, 2], q.boxes[fake][:, 3]
    assert (w <= 0.07 + 1e-6).all() and (w > 0).all()  # mean ± 2 std, then cut to the image
    assert (h > 0).all() and (h <= 0.7 + 1e-6).all() and h.max() > 0.6  # clipped to [0.002, 0.7]
    x1y1 = q.boxes[fake][:, :2] - q.boxes[fake][:, 2:] / 2
    x2y2 = q.boxes[fake][:, :2] + q.boxes[fake][:, 2:] / 2
    assert (x1y1 >= -1e-6).all() and (x2y2 <= 1 + 1e-6).all()
    assert q.descriptors.shape[-1] == descriptor_dims(num_classes) == num_classes + 266
    assert (q.descriptors[~q.valid] == 0).all()
    # jittered reference point stays within ±0.3 of the box size around its centre
    off = (q.ref_points - q.boxes[..., :2]).abs() / q.boxes[..., 2:]
    assert (off[q.valid] <= 0.3 + 1e-5).all()


def test_scale_bins_use_each_images_own_size() -> None:
    box = target([[0, 0, 100, 100]], [0])
    big = target([[0, 0, 400, 400]], [0])  # same normalized size in a 4× larger image
    priors = ClassPriorTensors(torch.ones(3), torch.full((3, 2), 0.2), torch.full((3, 2), 0.1))
    q = build_queries([box, big], [(128, 128), (512, 512)], priors, 3, 0.0, 300, 0.0, torch.Generator())
    torch.testing.assert_close(q.boxes[0, 0], q.boxes[1, 0])
    w_bins = q.descriptors[:, 0, 3 + 256 : 3 + 261].argmax(-1)
    assert w_bins.tolist() == [int(scale_bin(torch.tensor(100.0))), int(scale_bin(torch.tensor(400.0)))] == [1, 3]


def test_sampling_is_reproducible_by_seed_and_step_and_resumes_from_state() -> None:
    d = make_distiller()
    b = batch([TWO, EMPTY], [(128, 128), (100, 90)], step=7)
    q1, q2 = d.queries_for(b), d.queries_for(b)
    torch.testing.assert_close(q1.boxes, q2.boxes)
    b.step = 8
    assert not torch.equal(d.queries_for(b).boxes, q1.boxes)
    other = ICDDistiller(DistillSpec(), fake_detector(), fake_detector(), total_steps=100, seed=999)
    other.load_state_dict(d.state_dict())
    b.step = 7
    torch.testing.assert_close(other.queries_for(b).boxes, q1.boxes)
    assert step_generator(1, 0).initial_seed() != step_generator(2, 0).initial_seed()
    assert step_generator(1, 0).initial_seed() != step_generator(1, 1).initial_seed()


def test_optimizer_covers_icd_modules_with_cosine_schedule_and_clip() -> None:
    d = make_distiller(lr=1e-3, grad_clip=0.01)
    opt, sched = d.make_optimizer(total_steps=4)
    params = {id(p) for group in opt.param_groups for p in group["params"]}
    for module in (d.encoder, d.decoder, d.aux_head, d.adapter):
        assert all(id(p) in params for p in module.parameters())
    assert len(params) == len(list(d.parameters()))
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(1e-3) and lrs[2] == pytest.approx(5e-4) and lrs[4] == pytest.approx(0.0)
    out = d.compute(batch([TWO, ONE], [(128, 128), (128, 128)]))
    sum(out.losses.values()).backward()
    d.clip_gradients()
    total = torch.norm(torch.stack([p.grad.norm() for p in d.parameters() if p.grad is not None]))
    assert total.item() <= 0.01 + 1e-6
    report = d.report()
    assert set(report) >= {"icd_ident_acc", "icd_real_queries", "icd_fake_queries", "icd_attn_entropy"}


def test_adapter_lr_is_its_own_group_on_the_same_cosine() -> None:
    """adapter_lr (a labelled variant) moves only the adapter's lr; null keeps the release's single group."""
    assert len(make_distiller(lr=1e-4).make_optimizer(4)[0].param_groups) == 1
    d = make_distiller(lr=1e-4, adapter_lr=1e-2)
    opt, sched = d.make_optimizer(total_steps=4)
    decoder_side, adapter = opt.param_groups
    assert {id(p) for p in adapter["params"]} == {id(p) for p in d.adapter.parameters()}
    assert {id(p) for p in decoder_side["params"]} == {id(p) for p in d.decoder_parameters()}
    assert len(decoder_side["params"]) + len(adapter["params"]) == len(list(d.parameters()))
    opt.step()
    sched.step()
    opt.step()
    sched.step()  # half-way through the cosine: both groups at half their base lr
    assert (decoder_side["lr"], adapter["lr"]) == (pytest.approx(5e-5), pytest.approx(5e-3))


def test_one_step_with_real_detectors() -> None:
    """Contract check: student.forward_train + teacher.teacher_features feed ICD; one joint backward works."""
    from icd_core.detectors import build_detector

    torch.manual_seed(0)
    spec = ModelSpec(detector="retinanet", backbone="resnet18", fpn_channels=C, head_convs=1)
    student = build_detector(spec, num_classes=3, min_size=96, max_size=128)
    teacher = build_detector(
        spec.model_copy(update={"backbone": "resnet34"}), num_classes=3, min_size=96, max_size=128
    ).eval()
    d = ICDDistiller(DistillSpec(icd=ICDOptions(bypass_iters=0)), teacher, student, total_steps=10, seed=0)
    opt, sched = d.make_optimizer(10)
    images = [torch.rand(3, 96, 128), torch.rand(3, 80, 96)]
    targets = [target([[10, 10, 60, 50]], [2]), EMPTY]
    out = student.forward_train(images, targets)
    t_feats = teacher.teacher_features(out.image_list)
    b = DistillBatch(
        out.features, t_feats, out.targets, out.image_list.image_sizes, tuple(out.image_list.tensors.shape[-2:]), step=0
    )
    result = d.compute(b)
    assert len(t_feats) == 5 and result.weights.shape[-1] == sum(f.shape[-2] * f.shape[-1] for f in t_feats.values())
    torch.testing.assert_close(result.weights.sum(-1), torch.tensor([[1.0] * 8, [0.0] * 8]), atol=1e-4, rtol=0)
    sum({**out.losses, **result.losses}.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.model.backbone.fpn.layer_blocks[0][0].weight.grad.abs().sum() > 0
    d.clip_gradients()
    opt.step()
    sched.step()


def test_a_narrower_student_learns_through_the_adapter_in_the_teachers_width() -> None:
    """Teacher FPN 32 wide, student 16: the decoder works at 32, the adapter maps 16 -> 32, and the
    distillation loss reaches the student's features (after the bypass)."""
    torch.manual_seed(0)
    teacher = fake_detector()
    student = SimpleNamespace(num_classes=3, channels=16, spec=ModelSpec(detector="retinanet", fpn_channels=16))
    d = ICDDistiller(DistillSpec(icd=ICDOptions()), teacher, student, total_steps=100, seed=123)
    assert tuple(d.adapter.weight.shape) == (C, 16)
    g = torch.Generator().manual_seed(3)
    narrow = OrderedDict(
        (f"p{i + 3}", torch.randn(2, 16, h, w, generator=g).requires_grad_(True)) for i, (h, w) in enumerate(SHAPES)
    )
    out = d.compute(batch([TWO, ONE], [(128, 128), (96, 128)], student=narrow))
    assert out.losses["loss_icd_distill"].item() > 0
    out.losses["loss_icd_distill"].backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in narrow.values())
    wrong = OrderedDict((k, torch.randn(2, 24, *v.shape[-2:])) for k, v in narrow.items())
    with pytest.raises(ValueError, match="adapter's input width 16"):
        d.compute(batch([TWO, ONE], [(128, 128), (96, 128)], student=wrong))
