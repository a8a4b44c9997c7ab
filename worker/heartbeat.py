"""The worker's row in the `workers` table: who is alive, on what device, running which job.

A daemon thread beats every `worker_heartbeat_s`; the reporter may beat in between so a busy
worker never looks dead. Each beat also renews the running job's lease; a renewal the database
refuses because the job was reaped or taken over sets `lease_lost`, and the job stops at its next step
(a refusal for a job this attempt already ended or re-queued is not a loss).
CUDA is queried lazily, inside the process that trains.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable

from sqlalchemy.orm import Session

from store.jobs import renew_lease, taken_over
from store.settings import get_settings
from store.workers import heartbeat as write_heartbeat
from worker.db import sessions

log = logging.getLogger(__name__)


def describe_device() -> str:
    """'cpu' or e.g. 'cuda:0 NVIDIA H100 (CUDA_VISIBLE_DEVICES=1)'. Initialises CUDA: call it only
    in the training process."""
    try:
        import torch
    except ImportError:
        return "cpu"
    if not torch.cuda.is_available():
        return "cpu"
    idx = torch.cuda.current_device()
    desc = f"cuda:{idx} {torch.cuda.get_device_name(idx)}"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f"{desc} (CUDA_VISIBLE_DEVICES={visible})" if visible else desc


class Heartbeat:
    """Upserts this worker's row; `current_job_id` is set by the task while it runs."""

    def __init__(
        self,
        name: str,
        queues: str,
        interval_s: float | None = None,
        device: str | None = None,
        on_beat: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self.queues = queues
        self.interval_s = float(interval_s or get_settings().worker_heartbeat_s)
        self.hostname = socket.gethostname()
        self.device = device
        self.current_job_id: int | None = None
        self.current_attempt: int | None = None
        self.lease_s = float(get_settings().lease_timeout_s)
        self.lease_lost = threading.Event()
        self._settled: tuple[int, int] | None = None  # (job, attempt) that this attempt itself ended
        self.idle_since = time.monotonic()
        self.on_beat = on_beat  # periodic upkeep on the heartbeat thread (e.g. re-sending lost messages)
        self._last = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        """Write the row now; a database hiccup is logged, never raised (the next beat retries)."""
        with self._lock:
            if self.device is None:
                self.device = describe_device()
            try:
                with sessions()() as s:
                    write_heartbeat(
                        s, self.name, self.hostname, self.device, self.queues, os.getpid(), self.current_job_id
                    )
                    self._renew(s)
                self._last = time.monotonic()
            except Exception as exc:
                log.warning("heartbeat of %s failed: %s", self.name, exc)

    def confirm_lease(self) -> bool:
        """Renew the running job's lease now and say whether this attempt still holds it. A database
        error counts as not confirmed: the caller must not write files another attempt may own."""
        before = self._last
        self.beat()
        return self._last != before and not self.lease_lost.is_set()

    def _renew(self, s: Session) -> None:
        """Renew the running job's lease. A refusal is a lost lease only when another attempt or the reaper
        took the job: after this attempt ended or re-queued the job itself, the task has merely not yet
        cleared `current_job_id`, and stopping it or logging an error would be false alarms."""
        job_id, attempt = self.current_job_id, self.current_attempt
        if job_id is None or attempt is None or self.lease_lost.is_set() or self._settled == (job_id, attempt):
            return
        if renew_lease(s, job_id, self.name, attempt, self.lease_s):
            return
        if taken_over(s, job_id, attempt):
            log.error("job %s: attempt %s lost its lease (reaped); stopping it", job_id, attempt)
            self.lease_lost.set()
        else:
            log.debug("job %s: attempt %s already ended or re-queued it; no lease to renew", job_id, attempt)
            self._settled = (job_id, attempt)

    def beat_if_due(self) -> None:
        """Cheap when called often: writes only when half an interval has passed."""
        if time.monotonic() - self._last >= self.interval_s / 2:
            self.beat()

    def set_job(self, job_id: int | None, attempt: int | None = None) -> None:
        self.current_job_id, self.current_attempt = job_id, attempt
        self.lease_lost.clear()
        if job_id is None:
            self.idle_since = time.monotonic()
        self.beat()

    def start(self) -> None:
        """Beat once now, then every interval on a daemon thread (idempotent)."""
        if self._thread is not None:
            return
        self.beat()
        self._thread = threading.Thread(target=self._run, name="icd-heartbeat", daemon=True)
        self._thread.start()
        if self.on_beat is not None:
            threading.Thread(target=self._upkeep, name="icd-upkeep", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        """Beats only: a slow upkeep pass (the reaper, under a loaded database) must never delay a renewal."""
        while not self._stop.wait(self.interval_s):
            self.beat()

    def _upkeep(self) -> None:
        assert self.on_beat is not None
        while not self._stop.wait(self.interval_s):
            try:
                self.on_beat()
            except Exception as exc:
                log.warning("heartbeat upkeep of %s failed: %s", self.name, exc)
