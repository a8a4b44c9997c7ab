"""Checkpoint files: atomic writes, naming, retention, and the RNG state that makes resume exact.

A checkpoint is one torch file holding plain containers and tensors only, so it loads with
`torch.load(weights_only=True)` (a checkpoint from someone else's job cannot run code on load).
"""

from __future__ import annotations

import errno
import os
import random
import re
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..hashing import sha256_file
from .callbacks import CheckpointInfo

FINAL_NAME = "final.pt"
_PERIODIC = re.compile(r"^step_(\d+)\.pt$")


def periodic_name(step: int) -> str:
    return f"step_{step:07d}.pt"


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and python's random from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng() -> dict[str, Any]:
    """Every global RNG a training step may draw from, as checkpoint-safe values."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    np.random.set_state(
        (npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["gauss"])
    )
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:  # resumed on a machine with another GPU count: the current device's stream is what matters
            torch.cuda.set_rng_state(cuda_states[0])


def atomic_save(obj: Any, path: Path) -> None:
    """Write to `<name>.tmp` in the same folder, fsync, then rename over `path` (never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        _fault_injection_pause(path)
        os.replace(tmp, path)
    except BaseException as exc:
        full = isinstance(exc, Exception) and is_disk_full(exc, path.parent)  # measured before the partial file goes
        tmp.unlink(missing_ok=True)
        if full:
            raise DiskFull(disk_full_message(path.parent, path.name)) from exc
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


# --- a full disk -------------------------------------------------------------------------------------
# torch.save reports a full disk as "[enforce fail at inline_container.cc:...] unexpected pos ..." or
# "PytorchStreamWriter failed writing file ...": nothing in it says "no space left".
_TORCH_WRITE_FAILURE = re.compile(r"inline_container|PytorchStreamWriter|file write failed")
LOW_SPACE_BYTES = 64 * 2**20  # a torch write failure with less than this free is taken for a full disk


class DiskFull(OSError):
    """A write failed because the disk under the artifacts is full; the message says where and what to do."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.errno = errno.ENOSPC


def _causes(exc: BaseException) -> list[BaseException]:
    """The exception and what it was raised from or during (torch may wrap the OSError of the write)."""
    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in chain and len(chain) < 10:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    return chain


def free_bytes(folder: Path) -> int | None:
    """Free space of the filesystem holding `folder` (None when it cannot be read)."""
    usage = _usage(folder)
    return usage.free if usage is not None else None


def _usage(folder: Path) -> Any:
    """shutil.disk_usage of `folder`, or of its nearest existing parent (a job folder may not exist yet)."""
    for candidate in (Path(folder), *Path(folder).parents):
        try:
            return shutil.disk_usage(candidate)
        except OSError:
            continue
    return None


def is_disk_full(exc: BaseException, folder: Path) -> bool:
    """Whether a failed write into `folder` failed for want of space: ENOSPC/EDQUOT anywhere in its chain,
    or torch's stream-writer error (which drops the errno) while the filesystem has almost nothing free."""
    if any(isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) for e in _causes(exc)):
        return True
    if not (isinstance(exc, RuntimeError) and _TORCH_WRITE_FAILURE.search(str(exc))):
        return False
    free = free_bytes(folder)
    return free is not None and free < LOW_SPACE_BYTES


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def disk_full_message(folder: Path, what: str = "a file") -> str:
    """What a user reads when the artifact disk filled up: where, how much is free, and what to do."""
    usage = _usage(folder)
    space = f"{_size(usage.free)} free of {_size(usage.total)}" if usage is not None else "free space unknown"
    return (
        f"the artifact disk is full: writing {what} into {folder} failed ({space} on that filesystem); "
        "free space there (DELETE /jobs/<id> removes a finished job and its artifacts) or move the artifact "
        "root (ICD_ARTIFACT_ROOT) to a bigger disk, then retry the job: it resumes from its last checkpoint"
    )


# Fault-injection tests set this: the writer pauses between the write and the rename, after creating
# `<name>.paused`, so a test can kill the process inside that window.
PAUSE_BEFORE_RENAME_ENV = "ICD_TEST_PAUSE_BEFORE_RENAME_S"


def _fault_injection_pause(path: Path) -> None:
    pause = float(os.environ.get(PAUSE_BEFORE_RENAME_ENV) or 0)
    if pause > 0:
        path.with_name(path.name + ".paused").touch()
        time.sleep(pause)
        path.with_name(path.name + ".paused").unlink(missing_ok=True)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete `.tmp` files a killed writer left behind (call at the start of an attempt, before any
    writer of this run exists)."""
    if not Path(folder).is_dir():
        return []
    stale = [p for p in Path(folder).iterdir() if p.name.endswith((".tmp", ".paused"))]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def describe(path: Path, step: int, final: bool) -> CheckpointInfo:
    path = Path(path)
    return CheckpointInfo(
        name=path.name, path=path, step=step, size_bytes=path.stat().st_size, sha256=sha256_file(path), final=final
    )


def periodic_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of the periodic checkpoints in `folder`, oldest first."""
    if not Path(folder).is_dir():
        return []
    found = []
    for p in Path(folder).iterdir():
        m = _PERIODIC.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(folder: Path) -> Path | None:
    """final.pt when the run finished, else the periodic checkpoint with the highest step."""
    final = Path(folder) / FINAL_NAME
    if final.is_file():
        return final
    found = periodic_checkpoints(folder)
    return found[-1][1] if found else None


def prune_periodic(folder: Path, keep: int) -> None:
    """Delete all but the newest `keep` periodic checkpoints (final.pt is never touched)."""
    found = periodic_checkpoints(folder)
    for _, p in found[: max(0, len(found) - keep)]:
        p.unlink(missing_ok=True)


class NotACheckpoint(ValueError):
    """A file that `torch.load(weights_only=True)` refuses: garbage, truncated, or a pickle with code in it."""


def not_a_checkpoint_message(path: Path | str) -> str:
    return f"{path} is not a checkpoint written by this service (or by torch.save of a state dict)"


def load_checkpoint(path: Path | str, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    """The one reader of checkpoint files in the project: `weights_only=True`, so a file anyone names
    (a teacher, a model to fine-tune, a checkpoint to evaluate) is data and never runs code on load.

    mmap: map the tensors instead of reading them (a look at the keys and shapes of a large file reads
    only its index); a file in torch's legacy format, which cannot be mapped, is read whole.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = _torch_load(path, map_location, mmap)
    except Exception as err:  # unpickling refused or failed: say what the file is not, then why
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise NotACheckpoint(f"{not_a_checkpoint_message(path)}: {type(err).__name__}: {reason}") from err
    if not isinstance(obj, dict):
        raise NotACheckpoint(f"{not_a_checkpoint_message(path)}: it holds a {type(obj).__name__}, not a dict")
    return obj


def _torch_load(path: Path, map_location: str | torch.device, mmap: bool) -> Any:
    if mmap and zipfile.is_zipfile(path):  # torch.save's format since 1.6; the legacy one cannot be mapped
        return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    return torch.load(path, map_location=map_location, weights_only=True)
