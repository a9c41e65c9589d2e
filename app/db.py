"""The SQL store's plumbing: declarative base, engine and session factories, a UTC datetime type.

SQLite (the embedded default) and PostgreSQL (production) must behave the same to the code above
this module; everything backend-specific about connections lives here.
"""
from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import DateTime, Dialect, Engine, MetaData, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.types import TypeDecorator

# Explicit constraint names make migrations deterministic: SQLite's batch mode (which rebuilds a
# table to ALTER it) and PostgreSQL would otherwise each invent their own names, or none.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A timezone-aware UTC datetime on every backend.

    PostgreSQL stores it as timestamptz. SQLite has no timezone support, so the value is stored as
    naive UTC text (one fixed format, so SQL comparisons between stored values and bound
    parameters stay correct) and made aware again on the way out.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            # A naive datetime is ambiguous (local time? UTC?); refusing it catches the bug early.
            raise ValueError(f"naive datetime {value!r}: pass a timezone-aware datetime")
        value = value.astimezone(dt.timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.timezone.utc)
        return value.astimezone(dt.timezone.utc)


def _sqlite_pragmas(dbapi_connection: Any, connection_record: Any) -> None:
    # Gateway and workers are separate processes sharing one file: WAL lets readers run alongside
    # the writer, and busy_timeout makes a writer wait for the lock instead of failing at once.
    # busy_timeout comes first so that switching to WAL also waits.
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA busy_timeout=10000")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")  # off by default in SQLite; ON DELETE CASCADE needs it
    finally:
        cursor.close()


def make_engine(url: str) -> Engine:
    """An engine for a SQLite or PostgreSQL URL; plain ``postgresql://`` URLs get the psycopg 3 driver."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(parsed, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if parsed.drivername in ("postgresql", "postgres"):
        # SQLAlchemy's default PostgreSQL driver is psycopg2, which this project does not install.
        parsed = parsed.set(drivername="postgresql+psycopg")
    return create_engine(parsed, pool_pre_ping=True)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    # expire_on_commit=False: the store's functions commit and then return ORM objects, which
    # callers read after the session has moved on.
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def unit_of_work(session: Session) -> Iterator[None]:
    """Commit what the block did, or roll it all back if it raised: each store function's one transaction."""
    try:
        yield
        session.commit()
    except BaseException:
        session.rollback()
        raise
