"""Fixtures for the store and API tests: a migrated database on SQLite and on PostgreSQL, an app on it,
and the embedded (SQLite) broker so dispatched messages can be read back for real."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.orm import Session

from store.db import make_engine, session_factory, upgrade_database
from store.settings import Settings

PG_HOST = os.environ.get("ICD_TEST_PG_HOST", "127.0.0.1:5432")
PG_USERS = ("postgres", "root")
TABLES = ("metrics", "evaluations", "checkpoints", "attempts", "workers", "jobs", "api_tokens")


def _pg_admin() -> tuple[Any, str]:
    """An autocommit psycopg connection to the server's maintenance database, and the user that worked."""
    import psycopg

    last: Exception | None = None
    for user in PG_USERS:
        for db in ("postgres", "test"):
            try:
                conn = psycopg.connect(f"postgresql://{user}@{PG_HOST}/{db}", autocommit=True, connect_timeout=3)
                return conn, user
            except Exception as exc:  # try the next user/database
                last = exc
    raise ConnectionError(f"PostgreSQL at {PG_HOST} unreachable: {last}")


def skip_or_fail(reason: str) -> None:
    """Skip when a server is missing, but under CI=true a skipped backend is a failure."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (CI=true: PostgreSQL tests must run)")
    pytest.skip(reason)


@contextmanager
def fresh_pg_database() -> Iterator[str]:
    """Create an empty database icd_test_<random>; yield its SQLAlchemy URL; drop it afterwards."""
    try:
        admin, user = _pg_admin()
    except ConnectionError as exc:
        skip_or_fail(str(exc))
        raise
    name = f"icd_test_{uuid.uuid4().hex[:10]}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"postgresql+psycopg://{user}@{PG_HOST}/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_database() -> Any:
    """The fresh_pg_database context manager, for tests that need their own empty database."""
    return fresh_pg_database


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """One migrated PostgreSQL database for the whole session (tables are emptied per test)."""
    with fresh_pg_database() as url:
        upgrade_database(url)
        yield url


def _truncate(url: str) -> None:
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
    engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated, empty database on each backend."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'icd.db'}"
        upgrade_database(url)
        return url
    url = request.getfixturevalue("pg_url")
    _truncate(url)
    return url


@pytest.fixture
def session(db_url: str) -> Iterator[Session]:
    engine = make_engine(db_url)
    s = session_factory(engine)()
    yield s
    s.close()
    engine.dispose()


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> Settings:
    """Settings on the test database, the embedded broker in tmp_path, data roots at tmp_path/data."""
    (tmp_path / "data").mkdir(exist_ok=True)
    return Settings(
        home=tmp_path / "home",
        database_url=db_url,
        broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}",
        data_roots=[tmp_path / "data"],
    )


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    from api.main import create_app

    app = create_app(settings)
    with TestClient(app) as c:
        yield c
    app.state.engine.dispose()


def drain_queue(broker_url: str, queue: str) -> list[tuple[str, list[Any]]]:
    """Consume every message waiting on `queue`: (task name, args) of each Celery message."""
    from kombu import Connection

    out = []
    with Connection(broker_url) as conn:
        q = conn.SimpleQueue(queue)
        try:
            while True:
                try:
                    msg = q.get(block=True, timeout=0.5)
                except q.Empty:
                    break
                args = msg.decode()[0] if isinstance(msg.decode(), list) else []
                out.append((msg.headers.get("task"), list(args)))
                msg.ack()
        finally:
            q.close()
    return out


@pytest.fixture
def drain() -> Any:
    """drain_queue(broker_url, queue) as a fixture, so tests need not import conftest."""
    return drain_queue


@pytest.fixture
def api_and_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    """The API and the worker's task on one environment: ICD_* pointing at tmp_path."""
    from api.main import create_app
    from store.settings import get_settings
    from worker import db

    (tmp_path / "data").mkdir()
    monkeypatch.setenv("ICD_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ICD_DATABASE_URL", f"sqlite:///{tmp_path / 'icd.db'}")
    monkeypatch.setenv("ICD_BROKER_URL", f"sqla+sqlite:///{tmp_path / 'broker.db'}")
    monkeypatch.setenv("ICD_DATA_ROOTS", str(tmp_path / "data"))
    # The task runs in this process without the worker's heartbeat thread, so nothing renews its lease
    # between progress reports: an evaluation-only attempt on a loaded machine outlived the 20 s default
    # and the API's reaper took it back (CI). A lease longer than any test keeps the reaper out of it.
    monkeypatch.setenv("ICD_LEASE_TIMEOUT_S", "600")
    get_settings.cache_clear()
    db.dispose()
    upgrade_database(get_settings().database_url)
    app = create_app(get_settings())
    with TestClient(app) as c:
        yield c
    app.state.engine.dispose()
    db.dispose()
    get_settings.cache_clear()


@pytest.fixture
def secrets_by_name(settings: Settings) -> Iterator[dict[str, str]]:
    """alice and bob (users) and root (admin), created in the test database."""
    from store.tokens import create_token

    engine = make_engine(settings.database_url)
    with session_factory(engine)() as s:
        out = {name: create_token(s, name, admin=(name == "root"))[1] for name in ("alice", "bob", "root")}
    engine.dispose()
    yield out


@pytest.fixture
def public(settings: Settings, secrets_by_name: dict[str, str]) -> Iterator[TestClient]:
    """The API as a server beyond loopback sees it (tokens required), with alice, bob and root."""
    from api.main import create_app

    app = create_app(settings.model_copy(update={"listen_host": "0.0.0.0"}))
    with TestClient(app) as c:
        yield c
    app.state.engine.dispose()
