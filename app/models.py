"""ORM models of the job store. Every table here needs a matching migration in migrations/versions/."""
from __future__ import annotations

import datetime as dt

from sqlalchemy import BigInteger, Float, ForeignKey, Index, Integer, String
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
