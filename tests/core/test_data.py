"""CocoDataset, class priors, loaders (including exact resume) and spec source resolution."""

from __future__ import annotations

import json
import logging
from itertools import islice

import pytest
import torch
from pycocotools.coco import COCO

from icd_core.data import build_dataset, resolve_source, shapes_dir_for
from icd_core.data.coco import CocoDataset
from icd_core.data.loader import (
    ResumableSampler,
    collate_detection,
    infinite_batches,
    make_loader,
    make_train_loader,
)
from icd_core.data.priors import FALLBACK_MEAN, FALLBACK_STD, compute_priors, priors_from_dataset
from icd_core.spec import CocoSource, ShapesSource

# What the coco_mini fixture holds (see its info.description).
MINI_IMAGES = 5
MINI_ANNOTATIONS = 72
MINI_CROWD = 2
MINI_DEGENERATE = 2
MINI_CATEGORIES = 16


def test_counts_match_pycocotools(coco_mini, caplog):
    images, ann = coco_mini
    gt = COCO(str(ann))
    assert len(gt.getImgIds()) == MINI_IMAGES and len(gt.getAnnIds()) == MINI_ANNOTATIONS
    assert len(gt.getAnnIds(iscrowd=True)) == MINI_CROWD

    with caplog.at_level(logging.WARNING, logger="icd_core.data.coco"):
        ds = CocoDataset(images, ann, train=False)
    assert "dropped 2 degenerate" in caplog.text
    assert len(ds) == MINI_IMAGES
    assert ds.num_classes == len(gt.getCatIds()) == MINI_CATEGORIES
    assert ds.num_crowd == MINI_CROWD and ds.num_degenerate == MINI_DEGENERATE
    assert ds.num_boxes == MINI_ANNOTATIONS - MINI_CROWD - MINI_DEGENERATE
    # Per image: every non-crowd annotation except the two hand-made degenerate ones on image 536.
    for i, img_id in enumerate(ds.image_ids):
        expected = len(gt.getAnnIds(imgIds=[img_id], iscrowd=False)) - (MINI_DEGENERATE if img_id == 536 else 0)
        assert len(ds.annotations(i)[0]) == expected


def test_label_cat_id_round_trip(coco_mini):
    ds = CocoDataset(*coco_mini, train=False)
    assert ds.label_to_cat_id == sorted(ds.label_to_cat_id)
    for label, cat_id in enumerate(ds.label_to_cat_id):
        assert ds.cat_id_to_label[cat_id] == label
        assert ds.class_names[label] == ds.coco.cats[cat_id]["name"]
    assert "toothbrush" in ds.class_names  # a category without boxes still has a label


def test_item_format(coco_mini):
    ds = CocoDataset(*coco_mini, train=False)
    for i in range(len(ds)):
        image, target = ds[i]
        h, w = ds.image_size(i)
        assert image.dtype == torch.float32 and image.shape == (3, h, w)
        assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
        assert target["orig_size"] == (h, w) and target["image_id"] == ds.image_ids[i]
        boxes, labels = target["boxes"], target["labels"]
        assert boxes.dtype == torch.float32 and labels.dtype == torch.int64
        assert boxes.shape == (len(labels), 4)
        if len(boxes):
            assert (boxes[:, 2] - boxes[:, 0] >= 1).all() and (boxes[:, 3] - boxes[:, 1] >= 1).all()
            assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
    empty = ds.image_ids.index(250)
    assert ds[empty][1]["boxes"].shape == (0, 4)


def test_training_split_skips_images_without_boxes(coco_mini):
    val = CocoDataset(*coco_mini, train=False)
    train = CocoDataset(*coco_mini, train=True)
    assert 250 in val.image_ids and 250 not in train.image_ids  # image 250 has no usable box
    assert train.num_empty_skipped == 1 and train.image_ids == [i for i in val.image_ids if i != 250]
    assert train.num_boxes == val.num_boxes
    for i, img_id in enumerate(train.image_ids):
        assert torch.equal(train.load(i)[1]["boxes"], val.load(val.image_ids.index(img_id))[1]["boxes"])


def test_flip_mirrors_image_and_boxes(coco_mini):
    plain = CocoDataset(*coco_mini, train=False)
    flipped = CocoDataset(*coco_mini, train=True, hflip=1.0)
    img, t = plain[plain.image_ids.index(536)]
    fimg, ft = flipped[flipped.image_ids.index(536)]
    w = img.shape[-1]
    assert torch.equal(fimg, img.flip(-1))
    assert torch.allclose(ft["boxes"][:, [0, 2]], w - t["boxes"][:, [2, 0]])
    assert torch.equal(ft["boxes"][:, [1, 3]], t["boxes"][:, [1, 3]])
    assert torch.equal(ft["labels"], t["labels"])


def test_flip_is_seeded(coco_mini):
    ds = CocoDataset(*coco_mini, train=True, hflip=0.5)

    def flips(items):
        return [bool(ds[item][0][0, 0, 0] != ds.load(ds_index(item))[0][0, 0, 0]) for item in items]

    def ds_index(item):
        return item[0] if isinstance(item, tuple) else item

    # Per-sample seeds decide the flip, whatever the global RNG state.
    items = [(i % len(ds), s) for i, s in enumerate(range(100, 112))]
    torch.manual_seed(1)
    a = flips(items)
    torch.manual_seed(2)
    assert flips(items) == a
    # Plain indices follow torch's global RNG, so seeding it makes them repeatable.
    torch.manual_seed(3)
    b = flips([i % len(ds) for i in range(12)])
    torch.manual_seed(3)
    assert flips([i % len(ds) for i in range(12)]) == b


def test_priors(coco_mini, tmp_path):
    ds = CocoDataset(*coco_mini, train=True)
    p = compute_priors(ds, cache_dir=tmp_path)
    assert p.freq.shape == (ds.num_classes,) and p.wh_mean.shape == (ds.num_classes, 2)
    assert p.wh_std.shape == (ds.num_classes, 2)
    assert abs(float(p.freq.sum()) - 1.0) < 1e-5 and (p.freq >= 0).all()

    counts = torch.zeros(ds.num_classes)
    for i in range(len(ds)):
        counts += torch.bincount(torch.from_numpy(ds.annotations(i)[1]), minlength=ds.num_classes)
    assert torch.allclose(p.freq, counts / counts.sum())
    tb = ds.class_names.index("toothbrush")
    assert p.freq[tb] == 0
    assert p.wh_mean[tb].tolist() == pytest.approx([FALLBACK_MEAN] * 2)
    assert p.wh_std[tb].tolist() == pytest.approx([FALLBACK_STD] * 2)
    seen = p.freq > 0
    assert ((p.wh_mean[seen] > 0) & (p.wh_mean[seen] <= 1)).all() and (p.wh_std >= 0).all()

    # A person's normalized width, checked by hand from the targets.
    person = ds.class_names.index("person")
    ws = []
    for i in range(len(ds)):
        boxes, labels = ds.annotations(i)
        h, w = ds.image_size(i)
        ws += ((boxes[labels == person, 2] - boxes[labels == person, 0]) / w).tolist()
    assert float(p.wh_mean[person, 0]) == pytest.approx(sum(ws) / len(ws), rel=1e-5)

    cached = list(tmp_path.glob("*.priors-*.json"))
    assert len(cached) == 1
    data = json.loads(cached[0].read_text())
    data["freq"][0] = 123.0  # prove the second call reads the cache
    cached[0].write_text(json.dumps(data))
    assert float(compute_priors(ds, cache_dir=tmp_path).freq[0]) == 123.0
    assert torch.equal(priors_from_dataset(ds).freq, p.freq)


def test_collate_and_finite_loader(shapes_tiny):
    ds = CocoDataset(*shapes_tiny, train=False)
    images, targets = collate_detection([ds[0], ds[1]])
    assert len(images) == len(targets) == 2 and targets[1]["image_id"] == ds.image_ids[1]
    batches = list(make_loader(ds, batch_size=5, shuffle=False))
    assert len(batches) == 5 and [t["image_id"] for t in batches[0][1]] == ds.image_ids[:5]
    assert len(list(make_loader(ds, batch_size=5, drop_last=True))) == 4

    order_a = [t["image_id"] for _, ts in make_loader(ds, 4, shuffle=True, seed=7) for t in ts]
    order_b = [t["image_id"] for _, ts in make_loader(ds, 4, shuffle=True, seed=7) for t in ts]
    assert order_a == order_b and sorted(order_a) == sorted(ds.image_ids)
    stream = infinite_batches(make_loader(ds, batch_size=10))
    assert len(list(islice(stream, 7))) == 7


def test_sampler_epochs_and_resume():
    n = 7
    full = list(islice(iter(ResumableSampler(n, seed=3)), 5 * n))
    for e in range(5):
        assert sorted(i for i, _ in full[e * n : (e + 1) * n]) == list(range(n))
    assert [i for i, _ in full[:n]] != [i for i, _ in full[n : 2 * n]]  # reshuffled per epoch
    for k in (0, 1, 6, 7, 13, 20):
        tail = list(islice(iter(ResumableSampler(n, seed=3, start_index=k)), 5 * n - k))
        assert tail == full[k:]
    other = list(islice(iter(ResumableSampler(n, seed=4)), 5 * n))
    assert other != full
    ordered = list(islice(iter(ResumableSampler(n, seed=3, shuffle=False)), 2 * n))
    assert [i for i, _ in ordered] == list(range(n)) * 2


def _batch_key(batch):
    images, targets = batch
    return [(t["image_id"], img.sum().item(), t["boxes"].tolist()) for img, t in zip(images, targets, strict=True)]


def test_train_loader_resumes_exactly(shapes_tiny):
    ds = CocoDataset(*shapes_tiny, train=True, hflip=0.5)
    bs, steps, k = 5, 12, 7  # 60 samples: crosses two epoch boundaries (24 images)
    full = [_batch_key(b) for b in islice(iter(make_train_loader(ds, bs, workers=0, seed=11)), steps)]
    resumed = [
        _batch_key(b) for b in islice(iter(make_train_loader(ds, bs, workers=0, seed=11, start_step=k)), steps - k)
    ]
    assert resumed == full[k:]
    # Some samples were flipped and some not: the same image appears with both orientations.
    sums: dict[int, set] = {}
    for batch in full:
        for image_id, s, _ in batch:
            sums.setdefault(image_id, set()).add(round(s, 3))
    assert any(len(v) > 1 for v in sums.values())


def test_train_loader_workers_match_main_process(shapes_tiny):
    ds = CocoDataset(*shapes_tiny, train=True, hflip=0.5)
    main = [_batch_key(b) for b in islice(iter(make_train_loader(ds, 4, workers=0, seed=5, start_step=3)), 4)]
    workers = [_batch_key(b) for b in islice(iter(make_train_loader(ds, 4, workers=2, seed=5, start_step=3)), 4)]
    assert workers == main


def test_resolve_source(coco_mini, tmp_path):
    images, ann = coco_mini
    assert resolve_source(CocoSource(images=str(images), annotations=str(ann)), tmp_path) == (images, ann)

    src = ShapesSource(num_images=3, image_size=64, seed=1, max_object=30, max_objects=3)
    images_dir, ann_json = resolve_source(src, tmp_path)
    assert images_dir.parent == shapes_dir_for(src, tmp_path) and ann_json.is_file()
    assert shapes_dir_for(src, tmp_path).name.startswith("shapes-")
    assert shapes_dir_for(src, tmp_path) == shapes_dir_for(src.model_copy(), tmp_path)
    assert shapes_dir_for(src.model_copy(update={"seed": 2}), tmp_path) != shapes_dir_for(src, tmp_path)
    ds = build_dataset(src, tmp_path, train=False)
    assert len(ds) == 3 and ds.class_names[:3] == ["circle", "square", "triangle"]


def test_priors_skip_read_only_folder(coco_mini, tmp_path):
    ann = tmp_path / "ro" / "instances.json"
    ann.parent.mkdir()
    ann.write_bytes(coco_mini[1].read_bytes())
    ann.parent.chmod(0o555)
    try:
        ds = CocoDataset(coco_mini[0], ann, train=True)
        assert compute_priors(ds).num_classes == ds.num_classes
        assert [p.name for p in ann.parent.iterdir()] == ["instances.json"]
    finally:
        ann.parent.chmod(0o755)
    assert len(list(ann.parent.glob("*.priors-*.json"))) == 0
    compute_priors(ds)  # writable again: cached next to the annotations
    assert len(list(ann.parent.glob("*.priors-*.json"))) == 1
