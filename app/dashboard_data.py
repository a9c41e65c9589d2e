"""What the dashboard pages show, read from the job store and the workers' heartbeats only (the gateway never
asks the engine): batches with progress, throughput and ETA; one batch in detail; the live latency and
throughput series; the admin view of workers."""
from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.batch_store import batch_counts, get_batch, list_batches, shards_of
from app.db import utcnow
from app.models import (
    BATCH_CANCELLED,
    BATCH_COMPLETED,
    BATCH_EXPIRED,
    BATCH_FAILED,
    BatchRequest,
    File,
    Worker,
    WorkerSample,
)
from app.worker_registry import latest_samples, samples_since

FINAL = {BATCH_COMPLETED, BATCH_FAILED, BATCH_EXPIRED, BATCH_CANCELLED}
RATE_WINDOW_S = 60.0  # throughput is measured over the last minute


@dataclass
class JobRow:
    id: str
    status: str
    endpoint: str
    filename: str
    created_at: dt.datetime
    total: int
    completed: int
    failed: int
    requests_per_min: float | None   # finished requests per minute, last minute
    eta_s: float | None
    output_file_id: str | None
    error_file_id: str | None
    final: bool

    @property
    def done(self) -> int:
        return self.completed + self.failed

    @property
    def percent(self) -> float:
        if self.status == BATCH_COMPLETED:
            return 100.0
        return 100.0 * self.done / self.total if self.total else 0.0


def job_rows(session: Session, owner: str | None, limit: int = 50, now: dt.datetime | None = None) -> list[JobRow]:
    return [_job_row(session, b, now or utcnow()) for b in list_batches(session, owner, limit=limit)]


def _job_row(session: Session, b: Any, now: dt.datetime) -> JobRow:
    counts = batch_counts(session, b)
    final = b.status in FINAL
    rate = None
    if not final:
        recent = session.scalar(select(func.count()).select_from(BatchRequest).where(
            BatchRequest.batch_id == b.id, BatchRequest.finished_at >= now - dt.timedelta(seconds=RATE_WINDOW_S)))
        rate = recent * 60.0 / RATE_WINDOW_S
    remaining = counts["total"] - counts["completed"] - counts["failed"]
    eta = remaining / (rate / 60.0) if rate and remaining > 0 else None
    filename = session.scalar(select(File.filename).where(File.id == b.input_file_id)) or b.input_file_id
    return JobRow(b.id, b.status, b.endpoint, filename, b.created_at, counts["total"], counts["completed"],
                  counts["failed"], rate, eta, b.output_file_id, b.error_file_id, final)


@dataclass
class JobDetail:
    row: JobRow
    batch: Any
    status_counts: dict[str, int]
    progress: list[tuple[float, float]]    # (seconds since start, requests finished so far)
    errors: list[dict[str, Any]]           # validation errors, then failed requests: line, code, message
    workers: list[str]
    running_shards: int
    shards: int


def job_detail(session: Session, batch_id: str, owner: str | None) -> JobDetail | None:
    batch = get_batch(session, batch_id, owner)
    if batch is None:
        return None
    row = _job_row(session, batch, utcnow())
    status_counts = dict(session.execute(select(BatchRequest.status, func.count()).where(
        BatchRequest.batch_id == batch_id).group_by(BatchRequest.status)).all())
    finished = session.scalars(select(BatchRequest.finished_at).where(
        BatchRequest.batch_id == batch_id, BatchRequest.finished_at.is_not(None)).order_by(
        BatchRequest.finished_at)).all()
    start = batch.in_progress_at or batch.created_at
    progress = _cumulative([(t - start).total_seconds() for t in finished])
    errors = [{"line": e.get("line"), "code": e.get("code"), "message": e.get("message")} for e in batch.errors or []]
    failed = session.execute(select(BatchRequest.line, BatchRequest.custom_id, BatchRequest.status,
                                    BatchRequest.error, BatchRequest.response).where(
        BatchRequest.batch_id == batch_id, BatchRequest.status == "failed").order_by(BatchRequest.line).limit(100))
    for line, custom_id, status, error, response in failed:
        message = (error or {}).get("message") or ((response or {}).get("error") or {}).get("message", status)
        errors.append({"line": line, "code": (error or {}).get("code") or "request_failed",
                       "message": f"{custom_id}: {message}"})
    workers = sorted({w for w in session.scalars(select(BatchRequest.worker_id).where(
        BatchRequest.batch_id == batch_id, BatchRequest.worker_id.is_not(None)).distinct())})
    shards = shards_of(session, batch_id)
    running = [s for s in shards if s.status == "running"]
    workers = sorted(set(workers) | {s.worker_id for s in running if s.worker_id})
    return JobDetail(row, batch, status_counts, progress, errors, workers, len(running), len(shards))


def _cumulative(offsets: list[float], max_points: int = 200) -> list[tuple[float, float]]:
    if not offsets:
        return []
    step = max(1, len(offsets) // max_points)
    points = [(0.0, 0.0)] + [(offsets[i], float(i + 1)) for i in range(step - 1, len(offsets), step)]
    if points[-1][1] != len(offsets):
        points.append((offsets[-1], float(len(offsets))))
    return points


@dataclass
class LiveSeries:
    """Per-worker time series of the last minutes, x = unix seconds."""
    since: float
    until: float
    slo_ttft_ms: float | None
    slo_tpot_ms: float | None
    by_worker: dict[str, dict[str, list[tuple[float, float | None]]]] = field(default_factory=dict)


LIVE_FIELDS = ("ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99", "online_tokens_per_s", "offline_tokens_per_s",
               "busy_fraction")


def live_series(session: Session, minutes: float = 10.0, now: dt.datetime | None = None) -> LiveSeries:
    now = now or utcnow()
    since = now - dt.timedelta(minutes=minutes)
    series: dict[str, dict[str, list]] = defaultdict(lambda: {f: [] for f in LIVE_FIELDS})
    for sample in samples_since(session, since):
        t = sample.at.timestamp()
        for f in LIVE_FIELDS:
            series[sample.worker_id][f].append((t, getattr(sample, f)))
    workers = session.scalars(select(Worker).where(Worker.id.in_(list(series)))).all() if series else []
    slo_ttft = min((w.slo_ttft_ms for w in workers), default=None)
    slo_tpot = min((w.slo_tpot_ms for w in workers), default=None)
    return LiveSeries(since.timestamp(), now.timestamp(), slo_ttft, slo_tpot, dict(series))


@dataclass
class WorkerRow:
    worker: Worker
    sample: WorkerSample | None
    alive: bool
    heartbeat_age_s: float


def admin_workers(session: Session, stale_after_s: float, now: dt.datetime | None = None) -> list[WorkerRow]:
    now = now or utcnow()
    workers = session.scalars(select(Worker).order_by(Worker.status.desc(), Worker.id)).all()
    samples = latest_samples(session, [w.id for w in workers])
    rows = []
    for w in workers:
        age = (now - w.last_heartbeat).total_seconds()
        rows.append(WorkerRow(w, samples.get(w.id), w.status == "online" and age <= stale_after_s, age))
    return rows
