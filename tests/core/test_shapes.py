"""The synthetic shapes dataset: determinism, caching, and that its annotations are sound."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from icd_core.data.coco import CocoDataset
from icd_core.data.shapes import CLASS_NAMES, MAX_OCCLUDED, ShapesParams, _render_image, make_shapes, shape_mask

SMALL = {"num_images": 6, "image_size": 80, "num_classes": 5, "min_object": 6, "max_object": 36, "max_objects": 6}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_different_seed_differs(tmp_path):
    a = make_shapes(tmp_path / "a", seed=3, **SMALL)
    b = make_shapes(tmp_path / "b", seed=3, **SMALL)
    c = make_shapes(tmp_path / "c", seed=4, **SMALL)
    files_a, files_b, files_c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert files_a == files_b
    assert files_a.keys() == files_c.keys()
    assert all(files_a[k] != files_c[k] for k in files_a if k.startswith("images/"))
    assert a[0] == tmp_path / "a" / "images" and a[1].name == "instances.json"
    assert b != c


def test_cache_reuse_and_regeneration(tmp_path):
    out = tmp_path / "ds"
    images, ann = make_shapes(out, seed=0, **SMALL)
    stamp = ann.stat().st_mtime_ns
    (images / "marker.txt").write_text("still here")  # a regenerated dataset would not keep this
    assert make_shapes(out, seed=0, **SMALL) == (images, ann)
    assert ann.stat().st_mtime_ns == stamp and (images / "marker.txt").exists()

    make_shapes(out, seed=0, **{**SMALL, "num_images": 4})  # other parameters: regenerated in place
    assert not (images / "marker.txt").exists()
    assert len(json.loads(ann.read_text())["images"]) == 4
    assert json.loads((out / "manifest.json").read_text())["params"]["num_images"] == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_refuses_foreign_folder_and_bad_params(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.txt").write_text("do not delete")
    with pytest.raises(ValueError, match="not a shapes dataset"):
        make_shapes(tmp_path / "mine", seed=0, **SMALL)
    assert (tmp_path / "mine" / "thesis.txt").exists()
    with pytest.raises(ValueError, match="min_object"):
        make_shapes(tmp_path / "x", seed=0, **{**SMALL, "max_object": 200})
    with pytest.raises(ValueError, match="num_classes"):
        make_shapes(tmp_path / "x", seed=0, **{**SMALL, "num_classes": len(CLASS_NAMES) + 1})


def test_annotations_are_sound(tmp_path):
    params = {**SMALL, "num_images": 20, "max_objects": 10}
    images, ann = make_shapes(tmp_path / "ds", seed=1, **params)
    data = json.loads(ann.read_text())
    assert [c["name"] for c in data["categories"]] == list(CLASS_NAMES[:5])
    size = params["image_size"]
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        assert 0 <= x and 0 <= y and x + w <= size and y + h <= size and w >= 1 and h >= 1
        assert a["iscrowd"] == 0 and 0 < a["area"] <= w * h
    ds = CocoDataset(images, ann, train=False)
    assert ds.num_boxes == len(data["annotations"]) and ds.num_degenerate == 0
    labels = np.concatenate([ds.annotations(i)[1] for i in range(len(ds))])
    assert len(set(labels.tolist())) >= 3  # several classes present
    image, _ = ds[0]
    assert image.shape == (3, size, size)


def test_occluded_objects_lose_their_annotation():
    # Many large objects in a small image: occlusion is certain, so some objects must be dropped,
    # and every kept object shows at least 40% of its pixels.
    params = ShapesParams(
        num_images=1, image_size=64, seed=0, num_classes=6, min_object=24, max_object=48, max_objects=20
    )
    kept = dropped = 0
    for index in range(10):
        _, anns, n_dropped = _render_image(params, index)
        kept, dropped = kept + len(anns), dropped + n_dropped
        assert all(a["visible"] >= 1.0 - MAX_OCCLUDED for a in anns)
    assert kept > 0 and dropped > 0


def test_every_class_has_a_distinct_mask():
    rng = np.random.default_rng(0)
    masks = {name: shape_mask(name, 40, 40, rng) for name in CLASS_NAMES}
    for name, m in masks.items():
        assert m.shape == (40, 40) and 0.1 < m.mean() <= 1.0, name
    assert len({m.tobytes() for m in masks.values()}) == len(CLASS_NAMES)
