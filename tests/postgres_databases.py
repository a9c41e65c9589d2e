"""Throwaway PostgreSQL databases on the CI machine's server, for tests that use the real thing."""
from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

# The server CI provides; a developer can point the tests at another one.
POSTGRES_ADMIN_URL = os.environ.get(
    "CONSERVE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@contextlib.contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """The URL of a new, empty database, dropped afterwards. Fails (never skips) without a server."""
    name = f"conserve_test_{secrets.token_hex(6)}"
    # AUTOCOMMIT: CREATE/DROP DATABASE cannot run inside a transaction.
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # noqa: BLE001  (any connection failure means the same thing here)
        admin.dispose()
        pytest.fail(
            f"PostgreSQL is required for these tests and is not reachable at {POSTGRES_ADMIN_URL} "
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
