"""Alembic environment for the ConServe job store (used by app.migrate and by the alembic CLI).

The database URL comes from `-x url=...`, else the Config's sqlalchemy.url (app.migrate sets it),
else $CONSERVE_DATABASE_URL.
"""
from __future__ import annotations

import os
from logging.config import fileConfig
from typing import Any

from alembic import context
from sqlalchemy import Connection, text

import app.models  # noqa: F401  (registers the tables on Base.metadata)
from app.db import Base, UTCDateTime, make_engine

# Any fixed number: every process migrating a PostgreSQL database takes this same advisory lock.
_PG_MIGRATION_LOCK = 0x436F6E5365727665  # "ConServe"

config = context.config
if config.config_file_name is not None:  # the CLI, with alembic.ini; app.migrate leaves logging alone
    fileConfig(config.config_file_name)
target_metadata = Base.metadata


def _database_url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    url = url or os.environ.get("CONSERVE_DATABASE_URL")
    if not url:
        raise RuntimeError(
            "no database URL for migrations: pass `-x url=...` to alembic, set CONSERVE_DATABASE_URL, "
            "or call app.migrate.migrate(url)"
        )
    return url


def _render_item(type_: str, obj: Any, autogen_context: Any) -> str | bool:
    # Migrations must not import app code (it changes after they are written): spell the
    # project's column types in plain SQLAlchemy.
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def _configure(**kwargs: Any) -> None:
    context.configure(
        target_metadata=target_metadata,
        render_as_batch=True,  # SQLite can only ALTER by rebuilding the table; batch mode does that
        compare_type=True,
        render_item=_render_item,
        **kwargs,
    )


def _lock(connection: Connection) -> None:
    """Take a database-wide lock for the whole upgrade, so concurrent migrators run one after another
    and the later ones find the schema at head instead of racing to create the same tables."""
    if connection.dialect.name == "sqlite":
        # Batch mode ALTERs a table by copying it and dropping the original; with foreign keys on,
        # that DROP would cascade-delete every referencing row. The pragma only takes effect
        # outside a transaction, so it goes first; _check_foreign_keys verifies the result instead.
        connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
        connection.exec_driver_sql("BEGIN IMMEDIATE")  # the write lock, waited for up to busy_timeout
    elif connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})


def _check_foreign_keys(connection: Connection) -> None:
    if connection.dialect.name == "sqlite":
        broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
        if broken:
            raise RuntimeError(f"migration left rows with dangling foreign keys: {broken[:10]}")


def run_migrations_offline() -> None:
    _configure(url=_database_url(), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(_database_url())
    try:
        with engine.connect() as connection:
            # The lock opens the transaction, so Alembic runs inside it and we commit it ourselves.
            _lock(connection)
            _configure(connection=connection)
            context.run_migrations()
            _check_foreign_keys(connection)
            connection.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
