"""Start and stop Celery worker processes for `icd serve` and `icd worker`.

The parent never imports torch (so it can never initialise CUDA before a fork): each worker is a
fresh `python -m celery ... worker --pool solo` process whose only GPU is chosen with
CUDA_VISIBLE_DEVICES. Workers run in their own session, so a terminal's Ctrl-C reaches only this
parent, which then stops them in order: SIGTERM (the running job checkpoints and goes back to the
queue), SIGQUIT after a grace period, SIGKILL last. A parent killed outright (kill -9, OOM) takes its
workers along (PR_SET_PDEATHSIG), so no orphaned worker keeps taking jobs; the reaper resumes theirs.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from worker.threads import THREADS_ENV

log = logging.getLogger(__name__)
HEALTHY_RUN_S = 30.0  # a worker that ran this long before dying restarts after 1 s again (no back-off)


def _die_with_parent() -> None:
    """Runs in the child before exec (Linux): SIGKILL it when the thread that started it dies."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: a SIGKILLed parent may leave its worker running
        pass


@dataclass
class WorkerSpec:
    """One Celery worker process: its name, the queues it consumes and extra environment."""

    name: str  # Celery hostname, e.g. gpu0@host
    queues: str  # e.g. "cuda,any"
    env: dict[str, str] = field(default_factory=dict)
    loglevel: str = "INFO"
    threads: int | None = None  # torch intra-op threads (worker.threads); None: the worker decides

    def process_env(self, base: Mapping[str, str]) -> dict[str, str]:
        """The worker's environment: `base`, this spec's entries, its thread count, and PYTHONPATH
        leading to this checkout so `worker.app` imports even when the project is not installed."""
        env = {**base, **self.env}
        if self.threads is not None:
            env[THREADS_ENV] = str(self.threads)
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        return env

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "worker.app",
            "worker",
            "--pool",
            "solo",
            "--concurrency",
            "1",
            "-Q",
            self.queues,
            "-n",
            self.name,
            "--loglevel",
            self.loglevel,
            "--without-mingle",
            "--without-gossip",
        ]


def visible_gpu_count() -> int:
    """GPUs this machine shows, found without importing torch (nvidia-smi or /proc), honouring
    CUDA_VISIBLE_DEVICES."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [v for v in visible.split(",") if v.strip() and v.strip() != "-1"]
        return len(ids)
    proc = Path("/proc/driver/nvidia/gpus")
    if proc.is_dir():
        return sum(1 for _ in proc.iterdir())
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10).stdout
            return sum(1 for line in out.splitlines() if line.startswith("GPU "))
        except (OSError, subprocess.SubprocessError):
            return 0
    return 0


class WorkerProcess:
    """A worker subprocess that is restarted (with back-off) if it dies while we still want it."""

    def __init__(self, spec: WorkerSpec, cwd: Path | None = None) -> None:
        self.spec = spec
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._stopping = threading.Event()
        self._watch: threading.Thread | None = None

    def start(self) -> None:
        self._spawn()
        self._watch = threading.Thread(target=self._watchdog, name=f"watch-{self.spec.name}", daemon=True)
        self._watch.start()

    def _spawn(self) -> None:
        self.proc = subprocess.Popen(
            self.spec.command(),
            env=self.spec.process_env(os.environ),
            cwd=self.cwd,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        log.info(
            "started worker %s (pid %s, queues %s, torch threads %s)",
            self.spec.name,
            self.proc.pid,
            self.spec.queues,
            self.spec.threads or "its own choice",
        )

    def _watchdog(self) -> None:
        delay = 1.0
        while not self._stopping.is_set():
            assert self.proc is not None
            started = time.monotonic()
            code = self.proc.wait()
            if self._stopping.is_set():
                return
            if time.monotonic() - started > HEALTHY_RUN_S:
                delay = 1.0  # it ran fine for a while: a new crash is not part of a crash loop
            self.restarts += 1
            log.error("worker %s exited with code %s; restarting in %.0f s", self.spec.name, code, delay)
            if self._stopping.wait(delay):
                return
            delay = min(delay * 2, 60.0)
            self._spawn()

    def stop(self, grace_s: float = 30.0) -> int | None:
        """Warm stop (the running job is checkpointed and re-queued), then cold, then kill."""
        self._stopping.set()
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return proc.returncode if proc else None
        code: int | None = None
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGQUIT, 10.0), (signal.SIGKILL, 10.0)):
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                break
            try:
                code = proc.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                log.warning("worker %s did not stop after %s; escalating", self.spec.name, sig.name)
        self._kill_leftovers(proc.pid)
        return code if code is not None else proc.poll()

    @staticmethod
    def _kill_leftovers(pgid: int) -> None:
        """The worker leads its own process group (start_new_session): whatever it left there (data
        loader processes, say) goes with it, so nothing of the tree outlives the stop."""
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def wait_for_signal(procs: list[WorkerProcess], grace_s: float) -> None:
    """Block until SIGINT, SIGTERM or SIGHUP, then stop every worker (used by `icd worker`)."""
    stop = threading.Event()

    def _handler(signum: int, _frame: object) -> None:
        log.info("received %s: stopping %d worker(s)", signal.Signals(signum).name, len(procs))
        stop.set()

    old = {s: signal.signal(s, _handler) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        threads = [threading.Thread(target=p.stop, args=(grace_s,)) for p in procs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
