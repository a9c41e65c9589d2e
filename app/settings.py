"""Gateway settings, read once from `CONSERVE_*` environment variables (command-line flags override them)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from pydantic import field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def default_data_dir() -> Path:
    """Where the embedded platform keeps its database and files: $XDG_DATA_HOME/conserve."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "conserve"


def default_database_url() -> str:
    return f"sqlite:///{default_data_dir() / 'conserve.db'}"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CONSERVE_", extra="ignore")

    # The embedded platform's home: its SQLite store, uploaded and output files, the embedded broker's data.
    data_dir: Path = default_data_dir()
    database_url: str = ""                 # default: SQLite in data_dir
    host: str = "127.0.0.1"
    port: int = 8000
    # Bearer keys that may call /v1/*; none set means the API is open (the embedded default on loopback).
    # A comma-separated list in the environment, so NoDecode: pydantic-settings would expect JSON.
    api_keys: Annotated[list[str], NoDecode] = []
    admin_key: str | None = None
    # Shared secret between gateway and workers for the workers' internal endpoints (unset: no check,
    # fine on one machine; set it wherever workers listen beyond loopback).
    internal_token: str | None = None
    # A worker whose last heartbeat is older than this is treated as dead (workers beat every 2 s).
    worker_stale_after_s: float = 10.0
    # Online requests one worker may carry at once before the gateway answers 429: past this, a new
    # request would only wait in the engine's queue and miss its TTFT SLO anyway.
    max_inflight_per_worker: int = 128
    worker_connect_timeout_s: float = 5.0
    # Heartbeat samples older than this are deleted (the dashboard charts the last minutes).
    sample_retention_s: float = 3600.0
    # ---- offline jobs (OpenAI Batch API) ----
    broker_url: str = "redis://127.0.0.1:6379/0"
    files_dir: Path | None = None          # default: data_dir/files
    max_upload_bytes: int = 200 * 1024 * 1024
    max_batch_requests: int = 50_000       # OpenAI's limit per batch
    shard_size: int = 32                   # requests per Celery task
    # A worker renews its shard's lease every third of this; a lapsed lease (the worker died) is re-sent.
    shard_lease_s: float = 30.0
    broker_visibility_timeout_s: float = 600.0
    batch_maintenance_interval_s: float = 1.0  # how often the gateway finalises, expires and re-sends

    @model_validator(mode="after")
    def _inside_data_dir(self) -> "Settings":
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'conserve.db'}"
        if self.files_dir is None:
            self.files_dir = self.data_dir / "files"
        return self

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value
