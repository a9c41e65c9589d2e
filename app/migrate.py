"""Bring a database's schema up to date with the Alembic migrations in the repository's migrations/."""
from __future__ import annotations

import time
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy.exc import OperationalError

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(database_url: str) -> Config:
    """An Alembic Config built in code (no alembic.ini needed) for the given database."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # Config values go through configparser interpolation: a '%' (URL-encoded password) must be doubled.
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def migrate(database_url: str, attempts: int = 5) -> None:
    """`alembic upgrade head`. A no-op when already at head; safe to run from several processes at
    once (migrations/env.py serialises them with a database lock).

    SQLite answers "database is locked" at once, without waiting, where waiting could deadlock (two
    processes creating a new file and both switching it to WAL, seen on a loaded 2-core machine): such a
    migration is simply tried again."""
    for attempt in range(attempts):
        try:
            command.upgrade(alembic_config(database_url), "head")
            return
        except OperationalError as exc:
            if "database is locked" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
