"""The content hash of a COCO-format dataset as files: what a run's lineage records of its data.

The hash covers the annotation file's bytes and, for every image the annotations name (`images[].file_name`,
sorted, each once), its name relative to the image folder and its bytes; a named image that is missing
counts as `missing`. Images in the folder that no annotation names are left out: the run never reads them.

Hashing every image of a large set takes minutes, so each file's sha256 is kept in
`<cache>/lineage/data-<folder key>.json` beside its size and mtime_ns, and reused while those are unchanged:
a second run stats the files instead of reading them, and a changed annotation file re-reads only itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from .atomic_files import write_text_atomic
from .hashing import sha256_file

log = logging.getLogger(__name__)

CACHE_FOLDER = "lineage"
CACHE_FORMAT = 1
HASH_FORMAT = "icd-data-v1"  # changes when what the hash covers changes
MISSING = "missing"

# (size, mtime_ns, sha256) of one file: the cache's entry
Entry = list[Any]


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def cache_file(cache_dir: Path, images_dir: Path, annotations: Path) -> Path:
    """One record per (image folder, annotation file), by their absolute paths."""
    key = f"{images_dir.resolve()}\0{annotations.resolve()}"
    return Path(cache_dir) / CACHE_FOLDER / f"data-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def _load_record(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) and record.get("format") == CACHE_FORMAT else {}


def _image_names(annotations: Path) -> list[str]:
    """The image files an annotation file names, sorted, each once."""
    with open(annotations, "rb") as f:
        coco = json.load(f)
    images = coco.get("images") if isinstance(coco, dict) else None
    if not isinstance(images, list):
        raise ValueError(f"{annotations} is not a COCO annotation file (no `images` list); fix or replace it")
    return sorted({str(im["file_name"]) for im in images if isinstance(im, dict) and "file_name" in im})


def _known(entry: Any, stat: tuple[int, int] | None) -> str | None:
    """The cached sha256 of a file whose size and mtime_ns are still `stat`."""
    if stat is not None and isinstance(entry, list) and len(entry) == 3 and tuple(entry[:2]) == stat:
        return str(entry[2])
    return None


def _annotations(path: Path, record: dict[str, Any]) -> tuple[Entry, list[str]]:
    """The annotation file's entry and image names, from the record while the file is unchanged."""
    stat = _stat(path)
    if stat is None:
        raise FileNotFoundError(f"annotation file not found: {path}")
    cached = record.get("annotations") or {}
    sha = _known(cached.get("entry"), stat)
    if sha is not None and isinstance(cached.get("images"), list):
        return [*stat, sha], list(cached["images"])
    return [*stat, sha256_file(path)], _image_names(path)


def _image_entry(path: Path, cached: Any) -> Entry | None:
    """(size, mtime_ns, sha256) of one image, read only when the cache's entry is stale; None: missing."""
    stat = _stat(path)
    if stat is None:
        return None
    sha = _known(cached, stat)
    return [*stat, sha if sha is not None else sha256_file(path)]


def dataset_sha256(images_dir: str | Path, annotations: str | Path, cache_dir: str | Path | None = None) -> str:
    """`sha256:<hex>` of a COCO-format dataset (see the module docstring); cache_dir=None reads every file."""
    images_dir, annotations = Path(images_dir), Path(annotations)
    where = cache_file(Path(cache_dir), images_dir, annotations) if cache_dir is not None else None
    record = _load_record(where)
    ann_entry, names = _annotations(annotations, record)
    old_files = record.get("files") if isinstance(record.get("files"), dict) else {}
    files: dict[str, Entry] = {}
    h = hashlib.sha256(f"{HASH_FORMAT}\nannotations\t{ann_entry[2]}\n".encode())
    for name in names:
        entry = _image_entry(images_dir / name, old_files.get(name))
        if entry is not None:
            files[name] = entry
        h.update(f"{name}\t{entry[2] if entry is not None else MISSING}\n".encode())
    digest = f"sha256:{h.hexdigest()}"
    new = {
        "format": CACHE_FORMAT,
        "images_dir": str(images_dir.resolve()),
        "annotations": {"path": str(annotations.resolve()), "entry": ann_entry, "images": names},
        "files": files,
        "sha256": digest,
    }
    if where is not None and new != record:
        try:
            write_text_atomic(where, json.dumps(new))
        except OSError as exc:  # a read-only cache costs the next run a re-read, not this run
            log.warning("cannot write the data-hash cache %s: %s", where, exc)
    return digest
