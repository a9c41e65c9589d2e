"""Store fixtures: every store test runs on both backends for real, SQLite (a file, as in the
embedded default) and PostgreSQL (a throwaway database on the CI's server)."""
from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from app.db import make_engine, make_session_factory
from app.migrate import migrate

# The server CI provides; a developer can point the tests at another one.
POSTGRES_ADMIN_URL = os.environ.get(
    "CONSERVE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def _admin_engine():
    # AUTOCOMMIT: CREATE/DROP DATABASE cannot run inside a transaction.
    return create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")


@pytest.fixture
def postgres_database() -> Iterator[str]:
    """A fresh, empty PostgreSQL database, dropped afterwards. Fails (never skips) without a server."""
    name = f"conserve_test_{secrets.token_hex(6)}"
    admin = _admin_engine()
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # noqa: BLE001  (any connection failure means the same thing here)
        admin.dispose()
        pytest.fail(
            f"PostgreSQL is required for the store tests and is not reachable at {POSTGRES_ADMIN_URL} "
            f"(set CONSERVE_TEST_POSTGRES_URL to use another server): {exc}",
            pytrace=False,
        )
    try:
        yield make_url(POSTGRES_ADMIN_URL).set(drivername="postgresql", database=name).render_as_string(
            hide_password=False
        )
    finally:
        with admin.connect() as conn:
            # A leaked pool connection would make DROP DATABASE fail.
            conn.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :name"),
                {"name": name},
            )
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


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
