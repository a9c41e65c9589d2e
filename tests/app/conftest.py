"""Store fixtures: every store test runs on both backends for real, SQLite (a file, as in the
embedded default) and PostgreSQL (a throwaway database on the CI's server)."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from app.db import make_engine, make_session_factory
from app.migrate import migrate
from postgres_databases import fresh_postgres_database

@pytest.fixture
def postgres_database() -> Iterator[str]:
    """A fresh, empty PostgreSQL database, dropped afterwards. Fails (never skips) without a server."""
    with fresh_postgres_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database on each backend: a SQLite file (in a directory not yet created) or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store' / 'conserve.db'}"
    return request.getfixturevalue("postgres_database")


@pytest.fixture
def session_factory(database_url: str):
    """Sessions on a migrated database."""
    migrate(database_url)
    engine = make_engine(database_url)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def session(session_factory) -> Iterator[Session]:
    with session_factory() as s:
        yield s
