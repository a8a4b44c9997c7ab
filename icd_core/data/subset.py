"""A seeded part of a COCO source's images (`subset:` in a data source): the tuning split of a tuned study.

The part is materialised as a filtered copy of the annotation file in the cache (same categories, only
the chosen images and their annotations), so everything downstream — loaders, priors, pycocotools'
evaluation — sees an ordinary COCO file and needs no notion of a subset.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from pathlib import Path

from ..atomic_files import write_text_atomic
from ..spec import SubsetSpec


def split_image_ids(image_ids: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(held_out, rest): round(fraction · n) ids drawn with `seed` (at least one, never all), and the others.

    Drawn from the sorted ids, so the split depends on the set of images only, not on the file's order.
    """
    ids = sorted(set(int(i) for i in image_ids))
    if len(ids) < 2:
        raise ValueError(f"subset: a source of {len(ids)} image(s) cannot be split; it needs at least 2")
    k = min(max(1, round(fraction * len(ids))), len(ids) - 1)
    held = set(random.Random(seed).sample(ids, k))
    return sorted(held), [i for i in ids if i not in held]


def subset_annotations(annotations_json: str | Path, subset: SubsetSpec, cache_root: str | Path) -> Path:
    """The cached annotation file holding only `subset`'s part of `annotations_json`'s images."""
    src = Path(annotations_json)
    stat = src.stat()
    key = json.dumps([str(src.resolve()), stat.st_size, stat.st_mtime_ns, subset.model_dump(mode="json")])
    out = Path(cache_root) / "subsets" / f"{src.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if out.is_file():
        return out
    data = json.loads(src.read_text())
    held, rest = split_image_ids([img["id"] for img in data.get("images", [])], subset.fraction, subset.seed)
    keep = set(held if subset.part == "held_out" else rest)
    data["images"] = [img for img in data["images"] if int(img["id"]) in keep]
    data["annotations"] = [a for a in data.get("annotations", []) if int(a["image_id"]) in keep]
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(data))
    return out
