"""Batch shards leased to the workers that run them, and the results they record.

start_batch (app/batch_store.py) queues one batch_shards row per shard and the gateway sends one
broker task per shard. A shard's status:

    queued ──claim_shard──▶ running ──finish_shard──▶ done
      ▲   (attempts += 1,     │
      │    worker_id, lease)  ├── renew_shard: the holder extends its lease while it works
      ├──── release_shard ────┤   (the holder shuts down gracefully; it re-sends the task)
      └──── requeue_shard ────┘   (the lease ran out: the worker died; recovery re-sends the task)

A running shard whose lease ran out can also be claimed again directly (a redelivered task):
claim_shard takes it over. Claims are single conditional UPDATEs, so of two concurrent claimers
exactly one wins, on SQLite and PostgreSQL alike.

Work is at least once, results exactly once: record_result only writes a request that is still
pending, so a shard that runs twice never overwrites a result, and results arriving after the batch's
pending requests were closed (cancelled, expired) are dropped.

A worker's side:

    outcome = claim_shard(session, batch_id, shard, me, lease_s)
    "claimed": for each request of pending_requests(session, batch_id, shard): run it, record_result(s);
               renew_shard well within lease_s; if batch_status(...) is no longer "in_progress", stop
               and finish_shard (or release_shard when shutting down); else finish_shard at the end
    "done", "stopped" (the batch is cancelling, expired, ...): nothing to do
    "busy": another worker holds a live lease; it finishes, or its lease runs out and recovery
            (expired_leases, requeue_shard) sends the shard again
"""
from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from sqlalchemy import and_, exists, or_, select, update
from sqlalchemy.orm import Session

from app.db import unit_of_work, utcnow
from app.models import (
    BATCH_IN_PROGRESS,
    REQUEST_CANCELLED,
    REQUEST_COMPLETED,
    REQUEST_EXPIRED,
    REQUEST_FAILED,
    REQUEST_PENDING,
    SHARD_DONE,
    SHARD_QUEUED,
    SHARD_RUNNING,
    Batch,
    BatchRequest,
    BatchShard,
)

ClaimOutcome = Literal["claimed", "done", "busy", "stopped"]
RESULT_STATUSES = frozenset({REQUEST_COMPLETED, REQUEST_FAILED, REQUEST_CANCELLED, REQUEST_EXPIRED})


def claim_shard(
    session: Session, batch_id: str, shard: int, worker_id: str, lease_s: float, now: dt.datetime | None = None
) -> ClaimOutcome:
    """Lease the shard for lease_s seconds if its batch is in_progress and the shard is queued, or
    running under a lease that has run out (attempts += 1). Otherwise say why not: "done" (the shard
    is), "stopped" (the batch is not in_progress, or is gone) or "busy" (someone holds a live lease)."""
    now = now or utcnow()
    claimable = or_(
        BatchShard.status == SHARD_QUEUED,
        and_(BatchShard.status == SHARD_RUNNING, BatchShard.lease_expires_at <= now),
    )
    batch_in_progress = exists().where(Batch.id == batch_id, Batch.status == BATCH_IN_PROGRESS)
    with unit_of_work(session):
        claimed = _update(
            session, _this(batch_id, shard), claimable, batch_in_progress,
            status=SHARD_RUNNING, worker_id=worker_id, lease_expires_at=now + dt.timedelta(seconds=lease_s),
            attempts=BatchShard.attempts + 1, updated_at=now,
        )
    if claimed:
        return "claimed"
    why = session.execute(
        select(BatchShard.status, Batch.status).join(Batch, Batch.id == BatchShard.batch_id).where(_this(batch_id, shard))
    ).one_or_none()
    if why is None:
        return "stopped"
    shard_status, batch_status = why
    if shard_status == SHARD_DONE:
        return "done"
    return "stopped" if batch_status != BATCH_IN_PROGRESS else "busy"


def renew_shard(
    session: Session, batch_id: str, shard: int, worker_id: str, lease_s: float, now: dt.datetime | None = None
) -> bool:
    """Extend the worker's lease to now + lease_s; False if the worker no longer holds the shard."""
    now = now or utcnow()
    with unit_of_work(session):
        return _update(
            session, _this(batch_id, shard), _held_by(worker_id),
            lease_expires_at=now + dt.timedelta(seconds=lease_s), updated_at=now,
        )


def finish_shard(session: Session, batch_id: str, shard: int, worker_id: str, now: dt.datetime | None = None) -> bool:
    """The worker is through with the shard: done. False if it no longer held it."""
    with unit_of_work(session):
        return _update(
            session, _this(batch_id, shard), _held_by(worker_id),
            status=SHARD_DONE, lease_expires_at=None, updated_at=now or utcnow(),
        )


def release_shard(session: Session, batch_id: str, shard: int, worker_id: str, now: dt.datetime | None = None) -> bool:
    """Give the shard back, queued (a worker shutting down gracefully); False if it no longer held it."""
    with unit_of_work(session):
        return _update(
            session, _this(batch_id, shard), _held_by(worker_id),
            status=SHARD_QUEUED, worker_id=None, lease_expires_at=None, updated_at=now or utcnow(),
        )


def pending_requests(session: Session, batch_id: str, shard: int) -> list[BatchRequest]:
    """The shard's requests still to run, by line."""
    stmt = (
        select(BatchRequest)
        .where(BatchRequest.batch_id == batch_id, BatchRequest.shard == shard, BatchRequest.status == REQUEST_PENDING)
        .order_by(BatchRequest.line)
        .execution_options(populate_existing=True)
    )
    return list(session.scalars(stmt))


def record_result(
    session: Session, request_pk: int, *, status: str, status_code: int | None = None,
    response: dict[str, Any] | None = None, error: dict[str, Any] | None = None,
    worker_id: str | None = None, now: dt.datetime | None = None,
) -> bool:
    """Write one request's outcome if it is still pending; False if it was already finished (a shard
    run twice, or a batch closed meanwhile), in which case nothing changes."""
    result = dict(status=status, status_code=status_code, response=response, error=error, worker_id=worker_id, now=now)
    return record_results(session, [{"request_pk": request_pk, **result}]) == 1


def record_results(session: Session, results: list[dict[str, Any]]) -> int:
    """record_result for several requests in one transaction (each dict: request_pk and record_result's
    keyword arguments); returns how many were written."""
    for result in results:
        if result["status"] not in RESULT_STATUSES:
            raise ValueError(f"a result's status is one of {sorted(RESULT_STATUSES)}, not {result['status']!r}")
    written = 0
    with unit_of_work(session):
        for result in results:
            written += _update_requests(
                session, BatchRequest.id == result["request_pk"], BatchRequest.status == REQUEST_PENDING,
                status=result["status"], status_code=result.get("status_code"), response=result.get("response"),
                error=result.get("error"), worker_id=result.get("worker_id"), finished_at=result.get("now") or utcnow(),
            )
    return written


def expired_leases(session: Session, now: dt.datetime | None = None) -> list[BatchShard]:
    """Running shards of in-progress batches whose lease has run out (their worker died), oldest lease first."""
    stmt = (
        select(BatchShard)
        .join(Batch, Batch.id == BatchShard.batch_id)
        .where(
            BatchShard.status == SHARD_RUNNING,
            BatchShard.lease_expires_at <= (now or utcnow()),
            Batch.status == BATCH_IN_PROGRESS,
        )
        .order_by(BatchShard.lease_expires_at, BatchShard.batch_id, BatchShard.shard)
        .execution_options(populate_existing=True)
    )
    return list(session.scalars(stmt))


def queued_shards(session: Session) -> list[BatchShard]:
    """Queued shards of in-progress batches: what the broker should be holding a task for."""
    stmt = (
        select(BatchShard)
        .join(Batch, Batch.id == BatchShard.batch_id)
        .where(BatchShard.status == SHARD_QUEUED, Batch.status == BATCH_IN_PROGRESS)
        .order_by(BatchShard.batch_id, BatchShard.shard)
        .execution_options(populate_existing=True)
    )
    return list(session.scalars(stmt))


def requeue_shard(session: Session, batch_id: str, shard: int, now: dt.datetime | None = None) -> bool:
    """Put a shard whose lease has run out back in the queue; True for exactly one of several
    recovering gateways, which then sends its task again. False if the shard is no longer so."""
    now = now or utcnow()
    with unit_of_work(session):
        return _update(
            session, _this(batch_id, shard), BatchShard.status == SHARD_RUNNING, BatchShard.lease_expires_at <= now,
            status=SHARD_QUEUED, worker_id=None, lease_expires_at=None, updated_at=now,
        )


# --- helpers ------------------------------------------------------------------------------------


def _this(batch_id: str, shard: int) -> Any:
    return and_(BatchShard.batch_id == batch_id, BatchShard.shard == shard)


def _held_by(worker_id: str) -> Any:
    return and_(BatchShard.status == SHARD_RUNNING, BatchShard.worker_id == worker_id)


def _update(session: Session, *where: Any, **values: Any) -> bool:
    stmt = update(BatchShard).where(*where).values(**values).execution_options(synchronize_session=False)
    return bool(session.execute(stmt).rowcount)  # type: ignore[attr-defined]


def _update_requests(session: Session, *where: Any, **values: Any) -> int:
    stmt = update(BatchRequest).where(*where).values(**values).execution_options(synchronize_session=False)
    return session.execute(stmt).rowcount  # type: ignore[attr-defined,no-any-return]
