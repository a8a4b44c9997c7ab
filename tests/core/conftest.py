"""Shared data fixtures for the icd_core tests: the real-image COCO subset and small generated shapes sets."""

from __future__ import annotations

from pathlib import Path

import pytest

from icd_core.data.shapes import make_shapes

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


@pytest.fixture(scope="session")
def coco_mini() -> tuple[Path, Path]:
    """(images_dir, annotations_json) of 5 coco128 images: one without boxes, two with crowd boxes,
    two hand-made degenerate boxes, and a category (toothbrush) with no boxes at all."""
    root = FIXTURES / "coco_mini"
    return root / "images", root / "instances.json"


@pytest.fixture(scope="session")
def shapes_tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(images_dir, annotations_json) of 24 generated 96 px shapes images (4 classes)."""
    out = tmp_path_factory.mktemp("shapes") / "tiny"
    return make_shapes(
        out, num_images=24, image_size=96, seed=0, num_classes=4, min_object=8, max_object=40, max_objects=5
    )
