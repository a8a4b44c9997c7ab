"""Lineage: the data hash follows the bytes and is cached by stat, the code version follows the git tree,
and the reports list what the runs ran on, flagging differences."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from icd_cli.status_format import lineage_line
from icd_core import data_hash, lineage
from icd_core.data_hash import dataset_sha256
from icd_core.leaderboard import build_leaderboard, write_report
from icd_core.lineage_report import lineage_summary
from icd_core.study_plan import child_result, result_from_job


@pytest.fixture
def coco_copy(coco_mini: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    """A writable copy of the coco_mini fixture."""
    images, annotations = coco_mini
    root = tmp_path / "coco"
    shutil.copytree(images, root / "images")
    shutil.copy(annotations, root / "instances.json")
    return root / "images", root / "instances.json"


def _touch_later(path: Path) -> None:
    """Move the mtime on by a second: a same-size rewrite within one timestamp tick is the cache's blind spot."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_data_hash_follows_every_image_byte_and_the_annotations(coco_copy: tuple[Path, Path]) -> None:
    images, annotations = coco_copy
    first = dataset_sha256(images, annotations)
    assert first.startswith("sha256:") and dataset_sha256(images, annotations) == first

    image = images / "000000000250.jpg"
    original = image.read_bytes()
    image.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # one bit of one image
    changed_image = dataset_sha256(images, annotations)
    assert changed_image != first
    image.write_bytes(original)
    assert dataset_sha256(images, annotations) == first

    coco = json.loads(annotations.read_text())
    coco["annotations"][0]["bbox"][0] += 1
    annotations.write_text(json.dumps(coco))
    assert dataset_sha256(images, annotations) not in (first, changed_image)

    (images / "unrelated.txt").write_text("not named by any annotation")
    shutil.copy(Path(__file__).parents[1] / "fixtures" / "coco_mini" / "instances.json", annotations)
    assert dataset_sha256(images, annotations) == first  # files no annotation names are not covered


def test_data_hash_is_cached_by_stat_and_reread_when_a_file_changes(
    coco_copy: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images, annotations = coco_copy
    cache = tmp_path / "cache"
    reads: list[str] = []
    real = data_hash.sha256_file

    def counting(path: str | Path, *args: Any) -> str:
        reads.append(Path(path).name)
        return real(path, *args)

    monkeypatch.setattr(data_hash, "sha256_file", counting)
    parsed: list[Path] = []
    real_names = data_hash._image_names
    monkeypatch.setattr(data_hash, "_image_names", lambda p: parsed.append(p) or real_names(p))

    first = dataset_sha256(images, annotations, cache)
    assert len(reads) == 6 and len(parsed) == 1  # the annotation file and its 5 images
    assert first == dataset_sha256(images, annotations)  # the cache changes nothing about the value

    reads.clear(), parsed.clear()
    assert dataset_sha256(images, annotations, cache) == first
    assert reads == [] and parsed == []  # a second run stats the files, reads none

    image = images / "000000000531.jpg"
    data = bytearray(image.read_bytes())
    data[100] ^= 0xFF  # same size
    image.write_bytes(bytes(data))
    _touch_later(image)
    changed = dataset_sha256(images, annotations, cache)
    assert changed != first and reads == [image.name] and parsed == []  # only the changed image is re-read

    reads.clear()
    _touch_later(annotations)  # a touched annotation file is re-read and re-parsed; its images are not
    assert dataset_sha256(images, annotations, cache) == changed
    assert reads == [annotations.name] and len(parsed) == 1


def test_a_missing_image_changes_the_hash_without_failing(coco_copy: tuple[Path, Path]) -> None:
    images, annotations = coco_copy
    first = dataset_sha256(images, annotations)
    (images / "000000000643.jpg").unlink()
    assert dataset_sha256(images, annotations) != first


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True)


def test_code_version_is_the_commit_with_dirty_and_a_sources_hash(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    (root / "icd_core").mkdir(parents=True)
    module = root / "icd_core" / "m.py"
    module.write_text("X = 1\n")
    _git(root, "init", "-q")
    _git(root, "add", ".")
    _git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()

    clean = lineage.git_version(root)
    assert clean == {"version": head[:12], "commit": head, "dirty": False}
    sources = lineage.sources_sha256(root)
    (root / "notes.txt").write_text("untracked files are not a difference of the tree")
    assert lineage.git_version(root) == clean

    module.write_text("X = 2\n")
    dirty = lineage.git_version(root)
    assert dirty is not None and dirty["dirty"] and dirty["version"] == head[:12] + "-dirty"
    assert lineage.sources_sha256(root) != sources

    plain = tmp_path / "plain"  # not a checkout: the package's version, and the sources still identify it
    shutil.copytree(root / "icd_core", plain / "icd_core")
    assert lineage.git_version(plain) is None
    assert lineage.git_version(root / "icd_core") is None  # inside a checkout is not the checkout's top
    installed = lineage.code_version(plain)
    assert installed["source"] == "package" and installed["sources_sha256"] == lineage.sources_sha256(root)


def test_code_version_is_computed_once_per_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(lineage, "git_version", lambda root: calls.append(root))
    (tmp_path / "api").mkdir()
    lineage.code_version(tmp_path)
    lineage.code_version(tmp_path)
    assert len(calls) == 1


def test_package_versions_name_the_ones_installed() -> None:
    versions = lineage.package_versions()
    assert {"python", "torch", "torchvision", "numpy", "pycocotools"} <= set(versions)
    assert "not-a-package" not in versions


def test_collect_lineage_of_a_shapes_spec_hashes_the_generated_files(tmp_path: Path) -> None:
    from trainer_specs import train_spec

    from icd_core.data import resolve_source, shapes_dir_for
    from icd_core.spec import parse_spec

    spec = parse_spec(train_spec(1))
    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes(b"weights")
    record = lineage.collect_lineage(spec, tmp_path / "cache", teacher_path=teacher)
    assert set(record) == {"code", "packages", "data", "teacher_sha256"}
    assert record["teacher_sha256"] == hashlib.sha256(b"weights").hexdigest()
    images, annotations = resolve_source(spec.data.train, tmp_path / "cache")
    assert images.parent == shapes_dir_for(spec.data.train, tmp_path / "cache")
    assert record["data"]["train"] == dataset_sha256(images, annotations)
    assert record["data"]["train"] != record["data"]["val"]  # other seeds, other images


def _row(method: str, seed: int, code: str, train: str = "sha256:aa", job_id: int | None = None) -> dict[str, Any]:
    return {
        "method": method,
        "seed": seed,
        "metrics": {"AP": 1.0 + seed},
        "job_id": job_id,
        "lineage": {
            "code": {"version": code, "sources_sha256": "5" * 64, "source": "git"},
            "packages": {"python": "3.11.7", "torch": "2.14.1"},
            "data": {"train": train, "val": "sha256:bb"},
            "teacher_sha256": "c" * 64,
        },
    }


def test_the_report_lists_lineage_once_when_the_runs_agree(tmp_path: Path) -> None:
    rows = [_row("none", 0, "abc"), _row("icd", 0, "abc")]
    paths = write_report(rows, tmp_path, name="same")
    md = paths["md"].read_text()
    assert "## Lineage" in md and "Warning" not in md and "differs" not in md
    assert "| code.version | `abc` | all |" in md and "| packages.torch | `2.14.1` | all |" in md
    assert "| data.train | `sha256:aa` | all |" in md and f"| teacher_sha256 | `{'c' * 64}` | all |" in md
    report = json.loads(paths["json"].read_text())
    assert report["lineage"]["differs"] == []


def test_the_report_flags_runs_that_differ_and_names_them(tmp_path: Path) -> None:
    rows = [
        _row("none", 0, "abc", job_id=4),
        _row("icd", 0, "abc", job_id=5),
        _row("icd", 1, "def-dirty", train="sha256:zz", job_id=6),
        {"method": "icd", "seed": 2, "metrics": None, "status": "failed", "job_id": 7},
    ]
    md = write_report(rows, tmp_path, name="mixed")["md"].read_text()
    warning = next(line for line in md.splitlines() if "Warning" in line)
    assert "code.version, data.train" in warning
    assert md.index("Warning") < md.index("| method")  # above the table, where it is read
    assert "| **code.version (differs)** | `abc` | none seed 0 (job 4), icd seed 0 (job 5) |" in md
    assert "| **code.version (differs)** | `def-dirty` | icd seed 1 (job 6) |" in md
    assert "| **data.train (differs)** | `sha256:zz` | icd seed 1 (job 6) |" in md
    assert "| data.val | `sha256:bb` | all |" in md
    assert "No lineage recorded (ended before its run started): icd seed 2 (job 7)." in md


def test_lineage_rides_on_the_rows_of_both_paths() -> None:
    record = _row("icd", 0, "abc")["lineage"]
    assert child_result("icd", 0, {"final_metrics": {"AP": 1.0}, "lineage": record})["lineage"] == record
    assert child_result("icd", 0, None)["metrics"] is None
    spec = {"seed": 0, "distill": {"method": "icd"}}
    row = result_from_job(spec, "succeeded", {"AP": 2.0}, job_id=3, lineage=record)
    assert row["lineage"] == record
    summary = lineage_summary([row, _row("icd", 1, "other")])
    assert summary is not None and summary["differs"] == ["code.version"]
    assert build_leaderboard([{"method": "none", "seed": 0, "metrics": {"AP": 1.0}}])["lineage"] is None


def test_icd_status_prints_the_lineage_in_one_line() -> None:
    job = {"lineage": _row("icd", 0, "abc1234-dirty")["lineage"]}
    line = lineage_line(job)
    assert "code abc1234-dirty" in line and "train aa, val bb" in line and f"teacher {'c' * 12}" in line
    assert lineage_line({"lineage": None}) == ""
