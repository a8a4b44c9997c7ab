"""What the end-to-end tests share: the tiny model and data they train, the test Redis database, and
small process and polling helpers. One copy, so a change to the tiny run changes every test alike."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
# A Redis database number the other tests leave alone, flushed by `flushed_redis_url`; ICD_TEST_REDIS_DB
# lets two checkouts run the suite side by side on one Redis.
REDIS_DB = int(os.environ.get("ICD_TEST_REDIS_DB", "7"))
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# A RetinaNet-R18 with a 32-wide FPN on 64 px shapes: about 0.1-0.3 s a training step on one CPU thread.
TINY_MODEL: dict[str, Any] = {
    "detector": "retinanet",
    "backbone": "resnet18",
    "fpn_channels": 32,
    "levels": ["p3", "p4", "p5"],
    "anchor_sizes": [16, 32, 64],
    "head_convs": 1,
}


def tiny_shapes(num_images: int, seed: int) -> dict[str, Any]:
    return {
        "format": "shapes",
        "num_images": num_images,
        "image_size": 64,
        "seed": seed,
        "num_classes": 3,
        "min_object": 8,
        "max_object": 32,
        "max_objects": 3,
    }


def tiny_data(val_images: int = 8) -> dict[str, Any]:
    """16 training images (seed 1) and `val_images` validation images (seed 2), at 64 px."""
    return {
        "train": tiny_shapes(16, 1),
        "val": tiny_shapes(val_images, 2),
        "min_size": 64,
        "max_size": 64,
        "workers": 0,
    }


def tiny_schedule(iterations: int = 4, every: int | None = None, **overrides: Any) -> dict[str, Any]:
    """`iterations` steps at batch 2, lr 0.01, evaluated and checkpointed every `every` steps (default: once,
    at the end); `overrides` replace any schedule field."""
    every = iterations if every is None else every
    return {
        "iterations": iterations,
        "batch_size": 2,
        "lr": 0.01,
        "warmup_iters": 0,
        "eval_every": every,
        "checkpoint_every": every,
        "log_every": 1,
        **overrides,
    }


# The exported runtimes' latency (an export child per model: seconds each) is measured by the core tests,
# the deploy API test and the fault benchmark; the other service tests' jobs skip it.
TINY_DEPLOY: dict[str, Any] = {"exported_latency": False}


def tiny_train_spec(
    name: str = "teacher", iterations: int = 4, every: int | None = None, data: dict | None = None, **schedule: Any
) -> dict[str, Any]:
    """A TINY_MODEL train job (about 0.1-0.3 s a step). Long runs take a smaller lr: at 0.01 this model can
    diverge after about 50 steps, which would fail the job."""
    return {
        "kind": "train",
        "name": name,
        "device": "cpu",
        "data": data or tiny_data(),
        "model": dict(TINY_MODEL),
        "schedule": tiny_schedule(iterations, every, **schedule),
        "deploy": dict(TINY_DEPLOY),
    }


def tiny_distill_spec(teacher_ref: str, name: str = "student") -> dict[str, Any]:
    """An ICD student of the teacher `teacher_ref` (a path or job:<id>), 4 steps, no bypass."""
    return {
        "kind": "distill",
        "name": name,
        "device": "cpu",
        "data": tiny_data(),
        "teacher": {**TINY_MODEL, "checkpoint": teacher_ref},
        "student": dict(TINY_MODEL),
        "distill": {"method": "icd", "icd": {"bypass_iters": 0, "heads": 8}},
        "schedule": tiny_schedule(4),
        "deploy": dict(TINY_DEPLOY),
    }


def tiny_study_spec(name: str = "tiny-study") -> dict[str, Any]:
    """The service trains the teacher as a child job, then one `none` and one `icd` student (4 steps each)."""
    return {
        "kind": "study",
        "name": name,
        "device": "cpu",
        "data": tiny_data(),
        "teacher": dict(TINY_MODEL),
        "student": dict(TINY_MODEL),
        "teacher_schedule": tiny_schedule(4),
        "schedule": tiny_schedule(4),
        "deploy": dict(TINY_DEPLOY),
        "methods": ["none", "icd"],
        "seeds": [0],
        "teacher_min_ap": 0.0,
        "require_teacher_better": False,
        "distill": {"icd": {"bypass_iters": 0}},
    }


def hot_checkpoint(folder: Path) -> Path:
    """A 2-step tiny model whose classification bias is spread so it already scores AP > 0 (a tiny run's AP is
    0 at every step, which no pruner can tell apart: the sweep tests fine-tune this instead)."""
    import torch

    from icd_core.detectors import read_checkpoint
    from icd_core.runner import run_spec
    from icd_core.spec import parse_spec

    run = run_spec(parse_spec(tiny_train_spec("hot", iterations=2)), folder / "hot-run", cache_dir=folder / "c")
    saved = read_checkpoint(run.final_checkpoint)
    key = "model.head.classification_head.cls_logits.bias"
    saved["model"][key] = torch.randn(saved["model"][key].shape, generator=torch.Generator().manual_seed(0)) + 1.0
    path = folder / "hot.pt"
    torch.save(saved, path)
    return path


def flushed_redis_url() -> str:
    """The test Redis database, flushed; skip on a laptop without Redis, fail under CI=true."""
    import redis

    url = f"redis://127.0.0.1:6379/{REDIS_DB}"
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).flushdb()
    except redis.exceptions.ConnectionError as exc:
        if IN_CI:
            pytest.fail(f"Redis unreachable at {url} ({exc}); CI=true: these tests must run")
        pytest.skip(f"Redis unreachable at {url}: {exc}")
    return url


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """predicate()'s first truthy value, polled every `interval` s; AssertionError naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 60) -> int | None:
    """Send `sig` and wait; SIGKILL after `timeout`. Returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


def service_env(tmp: Path, **extra: str) -> dict[str, str]:
    """This environment without any ICD_ setting, a home under `tmp`, a 1 s heartbeat, and `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ICD_")}
    env.update(ICD_HOME=str(tmp / "home"), ICD_WORKER_HEARTBEAT_S="1", PYTHONPATH=str(REPO), **extra)
    return env


class TcpRelay:
    """A loopback TCP relay to a real server that a test can cut and restore: the server stays up for
    every other test while this test's client sees it vanish (connections reset, new ones refused)."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._open: list[Any] = []
        self.up = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            self._open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: Any, dst: Any) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.close()

    def cut(self) -> None:
        """Reset every open connection and refuse new ones (the server looks down)."""
        self.up = False
        for sock in self._open:
            with contextlib.suppress(OSError):
                sock.close()
        self._open.clear()

    def restore(self) -> None:
        self.up = True

    def close(self) -> None:
        self.cut()
        self._listener.close()


def succeed_with_checkpoint(database_url: str, artifact_root: str | Path, job_id: int) -> Path:
    """Mark a submitted job succeeded with a small final.pt in its artifact folder, through the store's
    own calls (for tests of who may name that file); returns the file."""
    from store.artifacts import ArtifactStore
    from store.db import make_engine, session_factory
    from store.jobs import claim_job, finish_job
    from store.results import add_checkpoint

    engine = make_engine(database_url)
    with session_factory(engine)() as s:
        claim_job(s, job_id, "w1")
        store = ArtifactStore(artifact_root)
        f = store.job_dir(job_id) / "checkpoints" / "final.pt"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"weights")
        add_checkpoint(s, job_id, 1, 2, "final.pt", store.relative(f), f.stat().st_size, store.sha256_file(f), True)
        finish_job(s, job_id, {"AP": 1.0})
    engine.dispose()
    return f


def one_child_study_spec(train_spec: dict[str, Any], name: str) -> dict[str, Any]:
    """A study over `train_spec`'s data and model with one `none` child and a 2-step teacher schedule."""
    return {
        "kind": "study",
        "name": name,
        "device": "cpu",
        "data": train_spec["data"],
        "teacher": train_spec["model"],
        "student": train_spec["model"],
        "methods": ["none"],
        "seeds": [0],
        "teacher_schedule": {"iterations": 2, "batch_size": 2},
        "schedule": {"iterations": 2, "batch_size": 2},
    }
