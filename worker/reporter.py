"""DbReporter: the trainer callback that writes a running job's progress into the database.

The training loop must not pay for reporting (target: under 1 % of step time). Scalars are
buffered and written as one bulk upsert per flush: every `flush_every` metric calls or every
`flush_interval_s` seconds, and at every evaluation, checkpoint and the end. By default a writer
thread does the periodic flushes and reads the job's cancel flag once per `cancel_check_s`, so the
loop itself only appends to a list and reads a boolean, whatever the database's latency; database
I/O releases the GIL. With background=False the same work happens inline (deterministic tests).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy.orm import Session, sessionmaker

from icd_core.engine.callbacks import Callback, CheckpointInfo, EvalResult
from icd_core.json_numbers import finite_floats
from store.artifacts import ArtifactStore
from store.jobs import stop_requests, update_progress
from store.results import (
    add_checkpoint,
    add_evaluation,
    add_metrics,
    forget_missing_checkpoints,
    record_lineage,
    start_attempt_series,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


class DbReporter(Callback):
    """Reports one attempt of one job. Metric rows are keyed (job, name, step): a resumed run
    rewriting the same steps upserts instead of duplicating."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        job_id: int,
        attempt: int,
        artifacts: ArtifactStore,
        *,
        flush_every: int = 20,
        flush_interval_s: float = 2.0,
        cancel_check_s: float = 1.0,
        on_flush: Callable[[], None] | None = None,
        stop_event: threading.Event | None = None,
        lease_lost: threading.Event | None = None,
        confirm_lease: Callable[[], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
        background: bool = True,
    ) -> None:
        self.sessions = sessions
        self.job_id = job_id
        self.attempt = attempt
        self.artifacts = artifacts
        self.flush_every = max(1, flush_every)
        self.flush_interval_s = flush_interval_s
        self.cancel_check_s = cancel_check_s
        self.on_flush = on_flush
        self.stop_event = stop_event
        self.lease_lost = lease_lost  # set by the heartbeat when another attempt took the job over
        self.confirm_lease = confirm_lease
        self.clock = clock
        self.background = background

        self.step = 0
        self.total: int | None = None
        self.cancel_requested = False
        self.preempted_by: int | None = None  # a job of higher priority asked this one to make room
        self.flushes = 0
        self._rows: list[tuple[str, int, float]] = []
        self._calls = 0
        self._last_flush = clock()
        self._last_cancel_check = clock()
        # Rate is measured from the first logged step, so model building and data caching at the
        # start do not inflate the ETA.
        self._rate_origin: tuple[float, int] | None = None
        self._sec_per_step: float | None = None
        self._rows_lock = threading.Lock()  # the loop appends while the writer swaps the buffer
        self._write_lock = threading.Lock()  # one database writer at a time
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._flush_due = False
        self._writer: threading.Thread | None = None

    # --- trainer callbacks -------------------------------------------------------------------

    def on_start(self, step: int, total_steps: int) -> None:
        self.step, self.total = step, total_steps
        # Earlier attempts' points above the resume step are superseded: drop them before writing anew.
        self._retry("attempt start", lambda s: start_attempt_series(s, self.job_id, self.attempt, step))
        self._write_progress()
        if self.background and self._writer is None:
            self._writer = threading.Thread(target=self._write_loop, name=f"icd-reporter-{self.job_id}", daemon=True)
            self._writer.start()

    def on_lineage(self, lineage: dict[str, Any]) -> None:
        # Written when the run starts, not when it ends: a failed job keeps what it ran on.
        self._retry("lineage", lambda s: record_lineage(s, self.job_id, self.attempt, lineage))

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.step = step
        now = self.clock()
        if self._rate_origin is None:
            self._rate_origin = (now, step)
        # NaN/inf cannot be stored as JSON-safe numbers; a divergence is raised by the trainer anyway.
        rows = [(name, step, v) for name, v in finite_floats(metrics).items()]
        log.info("step %s/%s %s", step, self.total or "?", " ".join(f"{n}={v:.4g}" for n, _, v in rows))
        with self._rows_lock:
            self._rows.extend(rows)
        self._calls += 1
        count_due = self._calls % self.flush_every == 0
        if self._writer is not None:
            if count_due:
                self._flush_due = True
                self._wake.set()
        elif count_due or now - self._last_flush >= self.flush_interval_s:
            self.flush()

    def on_evaluation(self, result: EvalResult) -> None:
        aps = " ".join(
            f"{k}={v:.2f}"
            for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")
            if (v := result.metrics.get(k)) is not None
        )
        log.info("evaluation at step %s: %s", result.step, aps)
        self.flush()
        self._retry(
            "evaluation",
            lambda s: add_evaluation(s, self.job_id, self.attempt, result.step, result.metrics, result.per_class),
        )

    def on_checkpoint(self, info: CheckpointInfo) -> None:
        self.step = max(self.step, info.step)
        self.flush()
        rel = self.artifacts.relative(info.path)
        self._retry(
            "checkpoint",
            lambda s: add_checkpoint(
                s, self.job_id, self.attempt, info.step, info.name, rel, info.size_bytes, info.sha256, info.final
            ),
        )
        # The trainer pruned older periodic checkpoints just before: their rows leave the list now.
        self._retry("checkpoint list", lambda s: forget_missing_checkpoints(s, self.job_id, self.artifacts.root))

    def on_end(self, step: int, final_metrics: dict[str, float]) -> None:
        self.step = step
        self._stop_writer()
        self.flush(final=True)
        self._retry("checkpoint list", lambda s: forget_missing_checkpoints(s, self.job_id, self.artifacts.root))

    def should_stop(self) -> bool:
        """Called every step. With the writer thread: two flag reads. Inline: clock comparisons and a
        database read at most once per cancel_check_s."""
        if self.stop_event is not None and self.stop_event.is_set():
            return True
        if self.lease_lost is not None and self.lease_lost.is_set():
            return True
        if self._writer is None:  # inline, or training ended (the post-training phase still hears a cancel)
            now = self.clock()
            if self._rows and not self._closed.is_set() and now - self._last_flush >= self.flush_interval_s:
                self.flush()
            if now - self._last_cancel_check >= self.cancel_check_s:
                self._check_cancel(now)
        return self.cancel_requested or self.preempted_by is not None

    def poll_preemption(self) -> bool:
        """For a job this reporter does not drive step by step (a DDP group): read the stop requests at
        most once per cancel_check_s; True once a preemption was requested."""
        now = self.clock()
        if self.preempted_by is None and now - self._last_cancel_check >= self.cancel_check_s:
            self._check_cancel(now)
        return self.preempted_by is not None

    def confirm_ownership(self) -> bool:
        """Before the final files: renew the lease now, synchronously (the heartbeat's `confirm_lease`),
        so no other attempt can own the job while this one writes them; a pending cancel also stops."""
        if self.should_stop():
            return False
        return self.confirm_lease() if self.confirm_lease is not None else True

    def close(self) -> None:
        """Stop the writer and write what is buffered (the task calls this however the run ended)."""
        self._stop_writer()
        if self._rows:
            self.flush()

    # --- the writer thread -----------------------------------------------------------------------

    def _write_loop(self) -> None:
        tick = min(self.flush_interval_s, self.cancel_check_s) / 2
        while not self._closed.is_set():
            self._wake.wait(tick)
            self._wake.clear()
            if self._closed.is_set():
                return
            now = self.clock()
            if self._rows and (self._flush_due or now - self._last_flush >= self.flush_interval_s):
                self._flush_due = False
                self.flush()
            if now - self._last_cancel_check >= self.cancel_check_s:
                self._check_cancel(now)

    def _stop_writer(self) -> None:
        self._closed.set()
        self._wake.set()
        writer, self._writer = self._writer, None
        if writer is not None and writer is not threading.current_thread():
            writer.join(timeout=30)

    def _check_cancel(self, now: float) -> None:
        self._last_cancel_check = now
        if self.cancel_requested:
            return
        try:
            with self.sessions() as s:
                self.cancel_requested, preempt = stop_requests(s, self.job_id)
            if preempt is not None and self.preempted_by is None:
                log.warning("job %s: preempted by job %s; checkpointing at the next step", self.job_id, preempt)
                self.preempted_by = preempt
        except Exception as exc:  # a busy database must not stop training
            log.warning("job %s: cancel check failed: %s", self.job_id, exc)

    # --- writes --------------------------------------------------------------------------------

    @property
    def sec_per_step(self) -> float | None:
        return self._sec_per_step

    def eta_s(self, now: float | None = None) -> float | None:
        """Seconds left at the average speed since the first logged step."""
        if self.total is None or self._rate_origin is None:
            return None
        t0, s0 = self._rate_origin
        done = self.step - s0
        if done <= 0:
            return None
        self._sec_per_step = ((now if now is not None else self.clock()) - t0) / done
        return max(0.0, (self.total - self.step) * self._sec_per_step)

    def flush(self, final: bool = False) -> None:
        """Write buffered metrics (one statement) and the progress row. A failed write keeps the
        rows for the next flush (bounded), so a database hiccup never stops training."""
        with self._write_lock:
            now = self.clock()
            self._last_flush = now
            with self._rows_lock:
                rows, self._rows = self._rows, []
            eta = 0.0 if final else self.eta_s(now)
            try:
                with self.sessions() as s:
                    if rows:
                        add_metrics(s, self.job_id, self.attempt, rows)
                    update_progress(s, self.job_id, self.step, self.total, eta, sec_per_step=self._sec_per_step)
                self.flushes += 1
            except Exception as exc:
                log.warning(
                    "job %s: metrics flush failed (%s); keeping %d rows for the next flush", self.job_id, exc, len(rows)
                )
                with self._rows_lock:
                    self._rows = (rows + self._rows)[-100_000:]
                if final:
                    raise
        if self.on_flush is not None:
            self.on_flush()

    def _write_progress(self) -> None:
        self._retry("progress", lambda s: update_progress(s, self.job_id, self.step, self.total, None))

    def _retry(self, what: str, fn: Callable[[Session], T], attempts: int = 3) -> T:
        """Evaluations and checkpoints must be recorded (job:<id> links need them): retry briefly."""
        for i in range(attempts):
            try:
                with self._write_lock, self.sessions() as s:
                    return fn(s)
            except Exception as exc:
                if i == attempts - 1:
                    raise
                log.warning("job %s: writing %s failed (%s); retrying", self.job_id, what, exc)
                time.sleep(0.5 * 2**i)
        raise AssertionError("unreachable")

    def summary(self) -> dict[str, Any]:
        return {"step": self.step, "total": self.total, "flushes": self.flushes, "sec_per_step": self._sec_per_step}
