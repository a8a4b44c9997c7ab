"""A run's lineage: what is needed to tell whether two results came from the same experiment.

`collect_lineage` records the code version, the versions of the packages that shape a result, the
content hash of each data split (`icd_core.data_hash`) and the teacher checkpoint's sha256. The runner
writes it into the run folder (lineage.json at the start, summary.json's `lineage` at the end), the
service keeps it on the job row, and the study and sweep reports list it (`icd_core.lineage_report`).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import logging
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from .data_hash import dataset_sha256
from .hashing import sha256_file

log = logging.getLogger(__name__)

PACKAGE = "icd-service"
REPO_ROOT = Path(__file__).resolve().parent.parent
# The project's own code a result depends on: the ML, and the service layers that run it.
SOURCE_PACKAGES = ("icd_core", "worker", "store", "api")
# Distributions whose versions change results or what the data decode to; missing ones are left out.
PACKAGES = ("torch", "torchvision", "numpy", "pillow", "pycocotools", "optuna", "onnxruntime")
GIT_TIMEOUT_S = 5.0


def _git(root: Path, *args: str) -> str | None:
    """stdout of a git command in `root`, or None (no git, not a checkout, too slow)."""
    try:
        done = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=GIT_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_version(root: Path) -> dict[str, Any] | None:
    """The commit of `root` when `root` is itself the top of a git work tree (not a package installed
    inside someone else's checkout), with `-dirty` when a tracked file differs from it."""
    top = _git(root, "rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != root.resolve():
        return None
    commit = _git(root, "rev-parse", "HEAD")
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    if not commit or status is None:
        return None
    dirty = bool(status)
    return {"version": commit[:12] + ("-dirty" if dirty else ""), "commit": commit, "dirty": dirty}


def sources_sha256(root: Path, packages: tuple[str, ...] = SOURCE_PACKAGES) -> str:
    """sha256 over the project's .py files (relative path and bytes, sorted): identifies a dirty tree or an
    install without git, where a version number alone says nothing about local edits."""
    h = hashlib.sha256()
    files = sorted(p for pkg in packages if (root / pkg).is_dir() for p in (root / pkg).rglob("*.py"))
    for path in files:
        h.update(f"{path.relative_to(root).as_posix()}\t{sha256_file(path)}\n".encode())
    return h.hexdigest()


def _package_version() -> str | None:
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None


def code_version(root: Path = REPO_ROOT) -> dict[str, Any]:
    """The git commit (a checkout) or the installed version, plus the sources' hash; once per (process, root):
    a process runs the code it loaded, whatever the files say later."""
    return dict(_code_version(root.resolve()))


@functools.cache
def _code_version(root: Path) -> dict[str, Any]:
    git = git_version(root)
    found = {"source": "git", **git} if git else {"source": "package", "version": _package_version() or "unknown"}
    return {**found, "sources_sha256": sources_sha256(root)}


def package_versions() -> dict[str, str]:
    """Python's version and each installed package of PACKAGES (CUDA's too once torch is loaded)."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    torch = sys.modules.get("torch")
    cuda = getattr(getattr(torch, "version", None), "cuda", None)
    if cuda:
        out["cuda"] = str(cuda)
    return out


def data_sha256(source: Any, cache_dir: Path) -> str:
    """The content hash of one spec data source. A shapes source is generated into the cache first (as the
    run does), then hashed as the files the run reads, so the hash also shows a generator whose output
    changed (a numpy or Pillow version) under unchanged parameters."""
    from .data import resolve_source  # generates shapes: numpy, Pillow and torch

    images, annotations = resolve_source(source, cache_dir)
    return dataset_sha256(images, annotations, cache_dir)


def collect_lineage(
    spec: Any, cache_dir: str | Path, teacher_path: str | Path | None = None, splits: tuple[str, ...] = ("train", "val")
) -> dict[str, Any]:
    """{"code", "packages", "data": {split: "sha256:..."}, "teacher_sha256"} of a train/distill/evaluate spec.

    teacher_sha256 is the hex digest, as the service lists a checkpoint's; splits: the data splits the run
    reads (an evaluation reads only `val`)."""
    cache = Path(cache_dir)
    return {
        "code": code_version(),
        "packages": package_versions(),
        "data": {split: data_sha256(getattr(spec.data, split), cache) for split in splits},
        "teacher_sha256": sha256_file(teacher_path) if teacher_path is not None else None,
    }
