"""ORM models of the job store. Every table here needs a matching migration in migrations/versions/."""
from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, UTCDateTime

WORKER_ONLINE = "online"
WORKER_OFFLINE = "offline"


class Worker(Base):
    """One engine process that registered itself; its id is chosen by the worker, so a restart re-registers."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    url: Mapped[str] = mapped_column(String)  # where the gateway reaches the worker over HTTP
    model: Mapped[str] = mapped_column(String, index=True)  # served model name, as clients ask for it
    device: Mapped[str] = mapped_column(String)  # "cpu", "cuda:0", ...
    policy: Mapped[str] = mapped_column(String)
    slo_ttft_ms: Mapped[float] = mapped_column(Float)
    slo_tpot_ms: Mapped[float] = mapped_column(Float)
    hostname: Mapped[str] = mapped_column(String)
    pid: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String, index=True)  # WORKER_ONLINE | WORKER_OFFLINE
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    last_heartbeat: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    max_model_len: Mapped[int] = mapped_column(Integer)

    def __repr__(self) -> str:
        return f"Worker(id={self.id!r}, model={self.model!r}, url={self.url!r}, status={self.status!r})"


class WorkerSample(Base):
    """One heartbeat's measurements: a time series per worker, pruned by age.

    Non-nullable measurements default to 0, so a worker that predates a newly added column can
    still report.
    """

    __tablename__ = "worker_samples"
    __table_args__ = (
        # latest_samples() seeks the newest row per worker; samples_since() reads one worker's range.
        Index("ix_worker_samples_worker_id_at", "worker_id", "at"),
    )

    # 64-bit on PostgreSQL: at one heartbeat a second from a hundred workers, 32-bit ids run out in
    # months even though old rows are pruned. SQLite only autoincrements a column typed INTEGER,
    # which is 64-bit there anyway.
    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    worker_id: Mapped[str] = mapped_column(String(64), ForeignKey("workers.id", ondelete="CASCADE"))
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)  # index: pruning and all-worker charts
    kv_usage: Mapped[float] = mapped_column(Float, default=0.0)  # share of KV blocks in use, 0..1
    checkpoint_usage: Mapped[float] = mapped_column(Float, default=0.0)
    running_online: Mapped[int] = mapped_column(Integer, default=0)
    running_offline: Mapped[int] = mapped_column(Integer, default=0)
    waiting_online: Mapped[int] = mapped_column(Integer, default=0)
    waiting_offline: Mapped[int] = mapped_column(Integer, default=0)
    busy_fraction: Mapped[float] = mapped_column(Float, default=0.0)  # share of the interval spent computing
    gpu_utilization: Mapped[float | None] = mapped_column(Float)  # NVML reading; None off CUDA
    # Seconds, over recent online requests; None while there were none.
    ttft_p50: Mapped[float | None] = mapped_column(Float)
    ttft_p99: Mapped[float | None] = mapped_column(Float)
    tpot_p50: Mapped[float | None] = mapped_column(Float)
    tpot_p99: Mapped[float | None] = mapped_column(Float)
    online_tokens_per_s: Mapped[float] = mapped_column(Float, default=0.0)
    offline_tokens_per_s: Mapped[float] = mapped_column(Float, default=0.0)
    # Cumulative since the worker started: rates are differences between samples.
    preemptions: Mapped[int] = mapped_column(Integer, default=0)
    layer_yields: Mapped[int] = mapped_column(Integer, default=0)
    checkpointed_tokens: Mapped[int] = mapped_column(Integer, default=0)
    restored_tokens: Mapped[int] = mapped_column(Integer, default=0)
    recomputed_tokens: Mapped[int] = mapped_column(Integer, default=0)

    def __repr__(self) -> str:
        return f"WorkerSample(worker_id={self.worker_id!r}, at={self.at.isoformat()})"


# Optional JSON columns store None as SQL NULL, not as the JSON value null.
_NullableJSON = JSON(none_as_null=True)

# --- the Batch API: files, batches, one row per request line, shards leased to workers -----------
# The state machines are described at the top of app/batch_store.py.

FILE_PURPOSE_BATCH = "batch"  # an uploaded input file
FILE_PURPOSE_BATCH_OUTPUT = "batch_output"  # an output or error file written at finalisation

BATCH_VALIDATING = "validating"
BATCH_FAILED = "failed"
BATCH_IN_PROGRESS = "in_progress"
BATCH_FINALIZING = "finalizing"
BATCH_COMPLETED = "completed"
BATCH_EXPIRED = "expired"
BATCH_CANCELLING = "cancelling"
BATCH_CANCELLED = "cancelled"

REQUEST_PENDING = "pending"
REQUEST_COMPLETED = "completed"
REQUEST_FAILED = "failed"
REQUEST_CANCELLED = "cancelled"
REQUEST_EXPIRED = "expired"

SHARD_QUEUED = "queued"
SHARD_RUNNING = "running"
SHARD_DONE = "done"


class File(Base):
    """An uploaded or generated file's metadata; its bytes live outside the database, keyed by id."""

    __tablename__ = "files"
    __table_args__ = (Index("ix_files_owner_created_at", "owner", "created_at"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # "file-" + 24 hex, chosen by the caller
    owner: Mapped[str | None] = mapped_column(String(64))  # hash of the creating API key; None when the API is open
    purpose: Mapped[str] = mapped_column(String(32))  # FILE_PURPOSE_*
    filename: Mapped[str] = mapped_column(String(255))  # display only, never a path
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)

    def __repr__(self) -> str:
        return f"File(id={self.id!r}, purpose={self.purpose!r}, bytes={self.bytes})"


class Batch(Base):
    """One OpenAI batch job. Live request counts are computed from batch_requests; counts_* are
    frozen when the batch reaches a final status."""

    __tablename__ = "batches"
    __table_args__ = (Index("ix_batches_owner_created_at", "owner", "created_at"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # "batch_" + 24 hex, chosen by the caller
    owner: Mapped[str | None] = mapped_column(String(64))
    endpoint: Mapped[str] = mapped_column(String(64))  # "/v1/chat/completions", ...
    input_file_id: Mapped[str] = mapped_column(String(64))  # no foreign key: the file may be deleted later
    completion_window: Mapped[str] = mapped_column(String(16))  # "24h"
    status: Mapped[str] = mapped_column(String(16), index=True)  # BATCH_*
    errors: Mapped[list[dict[str, Any]] | None] = mapped_column(_NullableJSON)  # [{"code","message","param","line"}]
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", _NullableJSON)
    output_file_id: Mapped[str | None] = mapped_column(String(64))
    error_file_id: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    in_progress_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    finalizing_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    completed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    failed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    # Set when the completion window ran out; while the status is still "finalizing" it marks a batch
    # whose finalisation ends in "expired".
    expired_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    cancelling_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    cancelled_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    counts_total: Mapped[int | None] = mapped_column(Integer)
    counts_completed: Mapped[int | None] = mapped_column(Integer)
    counts_failed: Mapped[int | None] = mapped_column(Integer)  # failed + cancelled + expired requests
    dispatched_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)  # every shard sent to the broker
    finalizer: Mapped[str | None] = mapped_column(String(64))  # who is writing the output files
    finalizer_claimed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)

    def __repr__(self) -> str:
        return f"Batch(id={self.id!r}, status={self.status!r}, endpoint={self.endpoint!r})"


class BatchRequest(Base):
    """One line of a batch's input file, and its outcome."""

    __tablename__ = "batch_requests"
    __table_args__ = (
        UniqueConstraint("batch_id", "custom_id", name="uq_batch_requests_batch_id_custom_id"),
        # Lines are unique too; the index also lets results_in_order stream in line order without a sort.
        UniqueConstraint("batch_id", "line", name="uq_batch_requests_batch_id_line"),
        Index("ix_batch_requests_batch_id_shard_status", "batch_id", "shard", "status"),  # a shard's pending work
        Index("ix_batch_requests_batch_id_status", "batch_id", "status"),  # counts, "anything pending?"
    )

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    batch_id: Mapped[str] = mapped_column(String(64), ForeignKey("batches.id", ondelete="CASCADE"))
    line: Mapped[int] = mapped_column(Integer)  # 1-based line of the input file
    custom_id: Mapped[str] = mapped_column(String(512))
    request_id: Mapped[str] = mapped_column(String(64))  # "batch_req_" + hex, chosen by the caller
    shard: Mapped[int] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(String(255))
    body: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16))  # REQUEST_*
    status_code: Mapped[int | None] = mapped_column(Integer)
    response: Mapped[dict[str, Any] | None] = mapped_column(_NullableJSON)  # the response body
    error: Mapped[dict[str, Any] | None] = mapped_column(_NullableJSON)  # {"code","message"}
    worker_id: Mapped[str | None] = mapped_column(String(64))
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)

    def __repr__(self) -> str:
        return f"BatchRequest(batch_id={self.batch_id!r}, line={self.line}, status={self.status!r})"


class BatchShard(Base):
    """A slice of a batch's requests (one model each), sent to the broker as one task and leased by
    the worker that runs it."""

    __tablename__ = "batch_shards"
    __table_args__ = (
        # expired_leases(): running shards whose lease ran out, without scanning every finished shard.
        Index("ix_batch_shards_status_lease_expires_at", "status", "lease_expires_at"),
    )

    batch_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True
    )
    shard: Mapped[int] = mapped_column(Integer, primary_key=True)
    model: Mapped[str] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(16))  # SHARD_*
    worker_id: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)

    def __repr__(self) -> str:
        return f"BatchShard(batch_id={self.batch_id!r}, shard={self.shard}, status={self.status!r})"
