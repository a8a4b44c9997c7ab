"""leader_lock: at most one process per name runs a piece of periodic work, however many API processes run.

PostgreSQL: a session-level advisory lock held on a dedicated connection; if the holder dies or loses its
connection the server releases it and another process takes over at its next attempt. SQLite (the
embedded mode, one host): an exclusive flock on a file beside the database, released by the kernel when
the holder exits. Other backends are refused rather than silently running the work N times.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from sqlalchemy import Engine, text

log = logging.getLogger(__name__)


def lock_key(name: str) -> int:
    """A stable signed 64-bit advisory-lock key for a name (the same in every process and release)."""
    return int.from_bytes(hashlib.sha256(f"icd:{name}".encode()).digest()[:8], "big", signed=True)


class LeaderLock:
    """A non-blocking, process-wide lock: try_acquire() until it returns True, then `held` while it lasts."""

    def __init__(self, engine: Engine, name: str) -> None:
        self.engine, self.name = engine, name
        self.backend = engine.dialect.name
        if self.backend not in ("postgresql", "sqlite"):
            raise NotImplementedError(f"leader_lock supports postgresql and sqlite, not {self.backend}")
        self._conn: Any = None
        self._file: IO[bytes] | None = None

    @property
    def held(self) -> bool:
        """True while this process holds the lock (for PostgreSQL: its connection is still alive)."""
        if self._file is not None:
            return True
        if self._conn is None:
            return False
        try:
            self._conn.execute(text("SELECT 1"))
            return True
        except Exception as exc:  # the server closed the session: the lock is gone with it
            log.warning("leader lock %s lost with its connection: %s", self.name, exc)
            self._drop_connection()
            return False

    def try_acquire(self) -> bool:
        """Take the lock if no other process holds it; never waits."""
        if self.held:
            return True
        if self.backend == "postgresql":
            conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            try:
                got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": lock_key(self.name)}).scalar())
            except Exception:
                conn.close()
                raise
            if got:
                self._conn = conn
            else:
                conn.close()
            return got
        f = open(self._lock_path(), "ab")  # noqa: SIM115 - kept open while the lock is held
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            return False
        self._file = f
        return True

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
        if self._conn is not None:
            try:
                self._conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": lock_key(self.name)})
            except Exception:  # closing the session releases it anyway
                pass
            self._drop_connection()

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        try:
            conn.invalidate()  # never hand a connection that held the lock back to the pool
            conn.close()
        except Exception:
            pass

    def _lock_path(self) -> Path:
        database = self.engine.url.database
        if not database or database == ":memory:":
            raise NotImplementedError("leader_lock needs a file-backed SQLite database")
        return Path(f"{os.path.abspath(database)}.{self.name}.lock")


@contextmanager
def leader_lock(engine: Engine, name: str) -> Iterator[bool]:
    """`with leader_lock(engine, "reaper") as leader: if leader: ...` — True in exactly one process."""
    lock = LeaderLock(engine, name)
    try:
        yield lock.try_acquire()
    finally:
        lock.release()
