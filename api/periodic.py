"""Periodic work of the API (e.g. the lease reaper), run by exactly one of however many API processes.

Every process runs a small thread; the one holding `store.leader.LeaderLock("api-periodic")` runs the
tasks, the others retry for the lock each tick, so when the leader exits another takes over within a
tick. A task gets a fresh session; its failures are logged and never stop the loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from store.db import session_scope
from store.leader import LeaderLock

log = logging.getLogger(__name__)
LOCK_NAME = "api-periodic"


@dataclass
class PeriodicTask:
    name: str
    interval_s: float
    run: Callable[[Session], Any]
    last_run: float = float("-inf")


class PeriodicRunner:
    """The thread that takes the leader lock and runs due tasks while it holds it."""

    def __init__(self, engine: Engine, sessions: sessionmaker[Session], tasks: list[PeriodicTask]) -> None:
        self.tasks, self.sessions = tasks, sessions
        self.lock = LeaderLock(engine, LOCK_NAME)
        self.tick_s = min([t.interval_s for t in tasks] + [1.0]) / 2
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="icd-periodic", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.lock.release()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if self.lock.try_acquire():
                    self.run_due(time.monotonic())
            except Exception as exc:  # a database outage: try again next tick
                log.warning("periodic work: %s", exc)
            self._stop.wait(self.tick_s)

    def run_due(self, now: float) -> None:
        for task in self.tasks:
            if now - task.last_run < task.interval_s:
                continue
            task.last_run = now
            try:
                with session_scope(self.sessions) as s:
                    task.run(s)
            except Exception:
                log.exception("periodic task %s failed", task.name)


def install_periodic(app: FastAPI, tasks: list[PeriodicTask]) -> None:
    """Run `tasks` for the app's lifetime (wrapping whatever lifespan the app already has)."""
    if not tasks:
        return
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a: FastAPI) -> AsyncIterator[Any]:
        runner = PeriodicRunner(a.state.engine, a.state.sessions, tasks)
        runner.start()
        a.state.periodic = runner
        try:
            async with inner(a) as state:
                yield state
        finally:
            runner.stop()

    app.router.lifespan_context = lifespan
