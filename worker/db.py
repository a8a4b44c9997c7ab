"""One database engine per worker process.

Engines (their pooled connections) must never cross a fork, so the engine is keyed by pid and
rebuilt in a new process instead of being inherited.
"""

from __future__ import annotations

import os

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from store.db import make_engine, session_factory
from store.settings import get_settings

_state: tuple[int, Engine, sessionmaker[Session]] | None = None


def sessions() -> sessionmaker[Session]:
    """The session factory of this process (created on first use)."""
    global _state
    if _state is None or _state[0] != os.getpid():
        if _state is not None:
            # Inherited from the parent: drop the pool without closing the parent's sockets.
            _state[1].dispose(close=False)
        engine = make_engine(get_settings().database_url)
        _state = (os.getpid(), engine, session_factory(engine))
    return _state[2]


def dispose() -> None:
    """Close this process's connections (before a fork, or at shutdown)."""
    global _state
    if _state is not None and _state[0] == os.getpid():
        _state[1].dispose()
    _state = None
