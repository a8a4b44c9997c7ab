"""Dataset errors name what to fix: the annotation file, or the image's path and id, also from
DataLoader worker processes (one line, not the worker's traceback)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from icd_core.data.coco import CocoDataset, ImageUnreadable
from icd_core.data.loader import make_loader

MINI = Path(__file__).resolve().parents[1] / "fixtures" / "coco_mini"


@pytest.fixture
def coco(tmp_path: Path) -> Path:
    dst = tmp_path / "coco"
    shutil.copytree(MINI, dst)
    return dst


def test_a_corrupt_annotation_file_is_named(coco: Path) -> None:
    bad = coco / "instances.json"
    bad.write_text('{"images": [{"id": 1, "file_name": "a\x01.jpg"}]}')
    with pytest.raises(ValueError, match=f"{bad} is not a valid COCO annotation file"):
        CocoDataset(coco / "images", bad, train=False)


@pytest.mark.parametrize("damage", ["missing", "truncated", "garbage"])
def test_an_unreadable_image_names_its_path_and_id(coco: Path, damage: str) -> None:
    ds = CocoDataset(coco / "images", coco / "instances.json", train=False)
    img_id = ds.image_ids[1]
    path = coco / "images" / ds.coco.imgs[img_id]["file_name"]
    if damage == "missing":
        path.unlink()
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:2000])
    else:
        path.write_bytes(b"not an image")
    with pytest.raises(ImageUnreadable, match=rf"image {img_id} \({path}\) in .* cannot be read"):
        ds.load(1)
    ds.load(0)  # the others still load


def test_the_message_survives_a_dataloader_worker(coco: Path) -> None:
    ds = CocoDataset(coco / "images", coco / "instances.json", train=False)
    path = coco / "images" / ds.coco.imgs[ds.image_ids[0]]["file_name"]
    path.write_bytes(b"garbage")
    with pytest.raises(ImageUnreadable) as info:
        next(iter(make_loader(ds, batch_size=1, workers=1)))
    message = str(info.value)
    assert message.startswith(f"image {ds.image_ids[0]} ({path})") and "Traceback" not in message
    assert "\n" not in message
