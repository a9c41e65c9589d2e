"""Bring a database's schema up to date with the Alembic migrations in the repository's migrations/."""
from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(database_url: str) -> Config:
    """An Alembic Config built in code (no alembic.ini needed) for the given database."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # Config values go through configparser interpolation: a '%' (URL-encoded password) must be doubled.
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def migrate(database_url: str) -> None:
    """`alembic upgrade head`. A no-op when already at head; safe to run from several processes at
    once (migrations/env.py serialises them with a database lock)."""
    command.upgrade(alembic_config(database_url), "head")
