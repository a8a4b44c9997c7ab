"""Decoder pre-training (distill.icd.pretrain): readiness stop, artifact reuse, cached == live features."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_trainer import cache_dir, teacher_run  # noqa: F401  (session fixtures)
from trainer_specs import distill_spec

from icd_core.detectors import load_detector
from icd_core.distill.icd import ICDDistiller
from icd_core.distill.icd_pretrain import (
    TeacherBatch,
    artifact_key,
    decoder_state,
    load_decoder,
    pretrain_decoder,
    save_artifact,
)
from icd_core.engine import checkpoint as ckpt
from icd_core.pretrain import run_pretraining, split_for_pretraining
from icd_core.runner import _open_datasets, build_trainer
from icd_core.spec import DistillSpec, ICDOptions, ICDPretrainSpec, ModelSpec, parse_spec

C, SIDE, GRID = 32, 128, 16  # one 16×16 level (stride 8) of a 128 px image


def planted_batch(seed: int, n: int = 4) -> TeacherBatch:
    """Noise features where every real object's cells carry a strong 'object' direction: a decoder that
    looks inside the query's box can tell real from fake (fakes mostly land on background)."""
    g = torch.Generator().manual_seed(seed)
    feats = 0.3 * torch.randn(n, C, GRID, GRID, generator=g)
    targets = []
    for i in range(n):
        boxes = []
        for _ in range(3):
            x1, y1 = (torch.randint(0, SIDE - 40, (2,), generator=g)).tolist()
            w, h = (torch.randint(24, 40, (2,), generator=g)).tolist()
            boxes.append([x1, y1, x1 + w, y1 + h])
            feats[i, :8, y1 // 8 : (y1 + h) // 8, x1 // 8 : (x1 + w) // 8] += 2.0
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.zeros(3, dtype=torch.long)})
    return TeacherBatch(OrderedDict(p3=feats), targets, [(SIDE, SIDE)] * n, (SIDE, SIDE))


class Planted:
    def __init__(self, batches: list[TeacherBatch]):
        self.batches, self.computed = batches, 0

    def __len__(self) -> int:
        return len(self.batches)

    def get(self, index: int) -> TeacherBatch:
        return self.batches[index]


def planted_distiller() -> ICDDistiller:
    torch.manual_seed(0)
    det = SimpleNamespace(num_classes=1, channels=C, spec=ModelSpec(detector="retinanet", fpn_channels=C))
    return ICDDistiller(DistillSpec(icd=ICDOptions(heads=4, neg_per_pos=3)), det, det, total_steps=100, seed=1)


@pytest.mark.slow  # ~800 steps, 16 s on one thread: the attention first stalls near uniform, as on real teachers
def test_pretraining_stops_once_ready_on_a_planted_signal() -> None:
    train, holdout = Planted([planted_batch(s) for s in range(8)]), [planted_batch(100), planted_batch(101)]
    opts = ICDPretrainSpec(steps=1500, lr=1e-3, min_auc=0.85, min_inbox_ratio=1.8, check_every=25)
    d = planted_distiller()
    before = decoder_state(d)
    result = pretrain_decoder(d, train, holdout, opts)
    assert result.ready and result.stopped == "ready" and result.steps < opts.steps
    last = result.checks[-1]
    assert last.auc >= 0.85 and last.inbox_ratio >= 1.8 and last.step == result.steps
    assert result.checks[0].auc < last.auc  # it learned on the way
    assert any(not torch.equal(before[k], v) for k, v in decoder_state(d).items())
    adapter = d.adapter.weight.detach().clone()
    assert torch.equal(adapter, d.adapter.weight)  # the student adapter is not pre-trained

    # a pure step budget never stops early
    d2 = planted_distiller()
    budget = pretrain_decoder(
        d2, train, holdout, ICDPretrainSpec(steps=30, min_auc=None, min_inbox_ratio=None, check_every=10)
    )
    assert (budget.steps, budget.ready, budget.stopped, len(budget.checks)) == (30, False, "step budget", 3)


def test_artifact_round_trip_and_mismatch_message(tmp_path: Path) -> None:
    d = planted_distiller()
    with torch.no_grad():
        d.decoder.pos_proj.weight.add_(1.0)
    save_artifact(tmp_path / "a.pt", d, "k", {"steps": 5})
    fresh = planted_distiller()
    assert load_decoder(fresh, tmp_path / "a.pt") == {"steps": 5}
    assert all(torch.equal(v, decoder_state(d)[k]) for k, v in decoder_state(fresh).items())
    det = SimpleNamespace(num_classes=1, channels=C, spec=ModelSpec(detector="retinanet", fpn_channels=C))
    other = ICDDistiller(DistillSpec(icd=ICDOptions(heads=4, layers=2)), det, det, total_steps=10, seed=0)
    with pytest.raises(ValueError, match="other ICD settings"):
        load_decoder(other, tmp_path / "a.pt")


def test_key_depends_on_teacher_data_and_decoder_settings_not_on_student_phase_options() -> None:
    icd = ICDOptions(pretrain=ICDPretrainSpec())
    key = artifact_key("sha-a", {"train": 1}, icd)
    assert key == artifact_key("sha-a", {"train": 1}, icd.model_copy(update={"lr": 5e-4, "bypass_iters": 3}))
    assert key != artifact_key("sha-b", {"train": 1}, icd)
    assert key != artifact_key("sha-a", {"train": 2}, icd)
    assert key != artifact_key("sha-a", {"train": 1}, icd.model_copy(update={"heads": 4}))
    assert key != artifact_key("sha-a", {"train": 1}, ICDOptions(pretrain=ICDPretrainSpec(lr=1e-4)))


def test_split_holds_out_images_and_spec_refuses_two_decoder_sources() -> None:
    train, held = split_for_pretraining(10, 3, 4, seed=0)
    flat_train, flat_held = [i for b in train for i in b], [i for b in held for i in b]
    assert len(flat_held) == 3 and sorted(flat_train + flat_held) == list(range(10)) and max(map(len, train)) == 4
    with pytest.raises(ValueError, match="either pretrain"):
        ICDOptions(pretrain=ICDPretrainSpec(), decoder="x.pt")


def _pretrain_spec(teacher: Path, **pretrain: object):
    raw = distill_spec(str(teacher), "icd", iterations=2)
    raw["distill"]["icd"]["pretrain"] = {
        "steps": 4,
        "check_every": 2,
        "holdout_images": 4,
        "min_auc": None,
        "min_inbox_ratio": None,
        **pretrain,
    }
    return parse_spec(raw)


def test_cached_features_and_live_teacher_give_the_same_decoder(teacher_run, cache_dir, tmp_path):  # noqa: F811
    teacher_dir, _ = teacher_run
    teacher_path = teacher_dir / "checkpoints" / "final.pt"
    states = {}
    for cached in (True, False):
        spec = _pretrain_spec(teacher_path, cache_features=cached, steps=8)
        trainer, _ = build_trainer(
            spec.model_copy(
                update={
                    "distill": spec.distill.model_copy(
                        update={"icd": spec.distill.icd.model_copy(update={"pretrain": None})}
                    )
                }
            ),
            tmp_path / f"r{cached}",
            cache_dir=cache_dir,
        )
        train_ds, _ = _open_datasets(spec, cache_dir)
        teacher, _ = load_detector(teacher_path, spec.data.train_sizes, spec.data.max_size)
        torch.manual_seed(0)
        distiller = trainer.distiller
        fresh = {k: v.clone() for k, v in decoder_state(distiller).items()}
        features = tmp_path / f"features-{cached}" if cached else None
        result = run_pretraining(distiller, teacher.eval(), train_ds, spec, torch.device("cpu"), features)
        assert result.steps == 8
        states[cached] = decoder_state(distiller)
        assert any(not torch.equal(fresh[k], v) for k, v in states[cached].items())
        if cached:
            # each training batch goes through the teacher once, however often the 8 steps cycle over them
            n_batches = len(split_for_pretraining(len(train_ds), 4, 2, 0)[0])
            assert result.teacher_forwards == len(list(features.iterdir())) == n_batches < 8
        else:
            assert result.teacher_forwards == 8
    for key, value in states[True].items():
        assert torch.equal(value, states[False][key]), key


def test_artifact_reused_for_the_same_teacher_and_retrained_for_another(teacher_run, cache_dir, tmp_path):  # noqa: F811
    teacher_dir, _ = teacher_run
    teacher_path = teacher_dir / "checkpoints" / "final.pt"
    cache = tmp_path / "cache"
    spec = _pretrain_spec(teacher_path)
    _, first = build_trainer(spec, tmp_path / "a", cache_dir=cache)
    assert first["icd_decoder"]["reused"] is False and first["icd_pretrain_steps"] == 4.0
    trainer, second = build_trainer(spec.model_copy(update={"seed": 1}), tmp_path / "b", cache_dir=cache)
    assert second["icd_decoder"]["reused"] is True and second["icd_decoder"]["key"] == first["icd_decoder"]["key"]
    assert second["icd_pretrain_seconds"] == first["icd_pretrain_seconds"]  # the cost of the one pre-training
    artifact = ckpt.load_checkpoint(Path(second["icd_decoder"]["source"]))
    for k, v in decoder_state(trainer.distiller).items():
        assert torch.equal(v, artifact["decoder_state"][k])

    other = tmp_path / "other-teacher.pt"
    state = ckpt.load_checkpoint(teacher_path)
    name = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][name] = state["model"][name] + 1e-3
    ckpt.atomic_save(state, other)
    _, third = build_trainer(_pretrain_spec(other), tmp_path / "c", cache_dir=cache)
    assert third["icd_decoder"]["reused"] is False and third["icd_decoder"]["key"] != first["icd_decoder"]["key"]
    assert len(list((cache / "icd_decoders").glob("*.pt"))) == 2

    named = distill_spec(str(teacher_path), "icd", iterations=2)
    named["distill"]["icd"]["decoder"] = second["icd_decoder"]["source"]
    trainer, by_path = build_trainer(parse_spec(named), tmp_path / "d", cache_dir=cache)
    assert by_path["icd_decoder"]["reused"] is True and by_path["icd_decoder"]["steps"] == 4
