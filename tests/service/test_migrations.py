"""Migrations: upgrade from empty, downgrade to base, and the models match the migrations — on both backends."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from store.db import (
    DatabaseNotMigrated,
    current_revision,
    downgrade_database,
    ensure_migrated,
    head_revision,
    make_engine,
    upgrade_database,
)
from store.models import Base
from store.settings import Settings

TABLES = {"jobs", "attempts", "metrics", "evaluations", "checkpoints", "workers", "api_tokens", "sweep_trials"}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database that has never been migrated."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
        return
    with request.getfixturevalue("pg_database")() as url:
        yield url


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_downgrade_and_models_match(empty_url: str) -> None:
    engine = make_engine(empty_url)
    try:
        with pytest.raises(DatabaseNotMigrated, match="run: icd db upgrade"):
            ensure_migrated(engine)

        upgrade_database(empty_url)
        assert TABLES <= _tables(empty_url)
        assert current_revision(engine) == head_revision()
        ensure_migrated(engine)

        # Autogenerate against the migrated schema must find nothing to change.
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
        assert diff == []

        downgrade_database(empty_url, "base")
        assert not (TABLES & _tables(empty_url))
        with pytest.raises(DatabaseNotMigrated, match="is at revision <empty>"):
            ensure_migrated(engine)

        upgrade_database(empty_url)  # and back up again
        ensure_migrated(engine)
    finally:
        engine.dispose()


def test_api_refuses_unmigrated_database_and_embedded_mode_migrates(tmp_path: Path) -> None:
    from api.main import create_app

    settings = Settings(home=tmp_path)
    with pytest.raises(DatabaseNotMigrated, match="icd db upgrade"):
        create_app(settings)
    app = create_app(Settings(home=tmp_path, auto_migrate=True))
    try:
        ensure_migrated(app.state.engine)
    finally:
        app.state.engine.dispose()


def test_upgrade_works_from_another_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`icd db upgrade` finds migrations/ relative to the package, not the working directory."""
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'x.db'}"
    upgrade_database(url)
    assert TABLES <= _tables(url)
