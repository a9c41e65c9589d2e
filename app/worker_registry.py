"""Worker registration, heartbeats and the heartbeat time series.

Convention: every function that writes commits its own unit of work before returning (and rolls
back what it started if it raises), so callers never hold a write lock longer than one call; this
matters on SQLite, where one writer at a time holds the whole file. Readers do not commit; they
reload rows they return (populate_existing), so a long-lived session still sees other processes'
committed writes instead of objects cached in its identity map.
"""
from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, aliased

from app.db import utcnow
from app.models import WORKER_OFFLINE, WORKER_ONLINE, Worker, WorkerSample

# What a heartbeat may report: the sample's id, owner and timestamp are the store's to set.
SAMPLE_FIELDS: frozenset[str] = frozenset(
    c.key for c in WorkerSample.__table__.columns if c.key not in ("id", "worker_id", "at")
)


class UnknownWorkerError(LookupError):
    """A heartbeat came from a worker the store does not know (e.g. the database was reset): re-register."""

    def __init__(self, worker_id: str) -> None:
        super().__init__(f"unknown worker {worker_id!r}: register it again")
        self.worker_id = worker_id


def register_worker(
    session: Session,
    *,
    worker_id: str,
    url: str,
    model: str,
    device: str,
    policy: str,
    slo_ttft_ms: float,
    slo_tpot_ms: float,
    hostname: str,
    pid: int,
    max_model_len: int,
    now: dt.datetime | None = None,
) -> Worker:
    """Insert or overwrite the worker's row (a restarted worker keeps its id), online as of now."""
    now = now or utcnow()
    values: dict[str, Any] = dict(
        url=url, model=model, device=device, policy=policy, slo_ttft_ms=slo_ttft_ms,
        slo_tpot_ms=slo_tpot_ms, hostname=hostname, pid=pid, max_model_len=max_model_len,
        status=WORKER_ONLINE, started_at=now, last_heartbeat=now,
    )
    # A native upsert: two registrations racing on one id cannot fail with a duplicate key.
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    stmt = insert(Worker).values(id=worker_id, **values)
    stmt = stmt.on_conflict_do_update(index_elements=[Worker.id], set_=values)
    try:
        session.execute(stmt)
        worker = session.get(Worker, worker_id, populate_existing=True)
        session.commit()
    except BaseException:
        session.rollback()
        raise
    assert worker is not None
    return worker


def record_heartbeat(
    session: Session, worker_id: str, sample: Mapping[str, Any], *, now: dt.datetime | None = None
) -> None:
    """Store one sample (keys: SAMPLE_FIELDS; missing measurements default to 0 or None) and mark the worker online.

    Raises ValueError for keys that are not sample columns, UnknownWorkerError if the worker has no row.
    """
    unknown = set(sample) - SAMPLE_FIELDS
    if unknown:
        raise ValueError(f"unknown heartbeat fields: {sorted(unknown)}")
    now = now or utcnow()
    try:
        # The UPDATE comes first so that on SQLite the transaction starts by taking the write lock
        # (waiting on busy_timeout) rather than reading and then failing to upgrade to a writer.
        result = session.execute(
            update(Worker)
            .where(Worker.id == worker_id)
            .values(last_heartbeat=now, status=WORKER_ONLINE)
            .execution_options(synchronize_session=False)
        )
        if result.rowcount == 0:  # type: ignore[attr-defined]
            raise UnknownWorkerError(worker_id)
        session.add(WorkerSample(worker_id=worker_id, at=now, **sample))
        session.commit()
    except BaseException:
        session.rollback()
        raise


def mark_offline(session: Session, worker_id: str) -> None:
    """A clean shutdown: the worker stops taking traffic at once instead of after the stale timeout."""
    _commit_or_rollback(
        session,
        update(Worker)
        .where(Worker.id == worker_id)
        .values(status=WORKER_OFFLINE)
        .execution_options(synchronize_session=False),
    )


def mark_stale_workers(session: Session, stale_after_s: float, now: dt.datetime | None = None) -> list[str]:
    """Mark offline the online workers silent for longer than stale_after_s; returns their ids, sorted."""
    cutoff = (now or utcnow()) - dt.timedelta(seconds=stale_after_s)
    result = _commit_or_rollback(
        session,
        update(Worker)
        .where(Worker.status == WORKER_ONLINE, Worker.last_heartbeat < cutoff)
        .values(status=WORKER_OFFLINE)
        .returning(Worker.id)
        .execution_options(synchronize_session=False),
        fetch=True,
    )
    return sorted(result)


def alive_workers(
    session: Session,
    model: str | None = None,
    *,
    stale_after_s: float,
    now: dt.datetime | None = None,
) -> list[Worker]:
    """Online workers heard from within stale_after_s (even if nobody has run mark_stale_workers), by id."""
    cutoff = (now or utcnow()) - dt.timedelta(seconds=stale_after_s)
    stmt = select(Worker).where(Worker.status == WORKER_ONLINE, Worker.last_heartbeat >= cutoff)
    if model is not None:
        stmt = stmt.where(Worker.model == model)
    stmt = stmt.order_by(Worker.id).execution_options(populate_existing=True)
    return list(session.scalars(stmt))


def latest_samples(session: Session, worker_ids: Iterable[str]) -> dict[str, WorkerSample]:
    """The newest sample of each given worker that has one, in a single query."""
    ids = list(dict.fromkeys(worker_ids))
    if not ids:
        return {}
    # Per worker, an index seek on (worker_id, at) to its newest row, instead of ranking every sample.
    newer = aliased(WorkerSample)
    newest_id = (
        select(newer.id)
        .where(newer.worker_id == Worker.id)
        .order_by(newer.at.desc(), newer.id.desc())
        .limit(1)
        .correlate(Worker)
        .scalar_subquery()
    )
    stmt = (
        select(WorkerSample)
        .join(Worker, WorkerSample.id == newest_id)
        .where(Worker.id.in_(ids))
        .execution_options(populate_existing=True)
    )
    return {s.worker_id: s for s in session.scalars(stmt)}


def samples_since(session: Session, since: dt.datetime, worker_id: str | None = None) -> list[WorkerSample]:
    """Samples taken at or after since (of one worker, or all), oldest first."""
    stmt = select(WorkerSample).where(WorkerSample.at >= since)
    if worker_id is not None:
        stmt = stmt.where(WorkerSample.worker_id == worker_id)
    stmt = stmt.order_by(WorkerSample.at, WorkerSample.id).execution_options(populate_existing=True)
    return list(session.scalars(stmt))


def prune_samples(session: Session, older_than: dt.datetime) -> int:
    """Delete samples taken before older_than; returns how many went."""
    result = _commit_or_rollback(
        session,
        delete(WorkerSample)
        .where(WorkerSample.at < older_than)
        .execution_options(synchronize_session=False),
    )
    return result.rowcount  # type: ignore[no-any-return]


def _commit_or_rollback(session: Session, stmt: Any, *, fetch: bool = False) -> Any:
    """Run one write statement as its own transaction; with fetch, return its RETURNING scalars."""
    try:
        result = session.execute(stmt)
        out = list(result.scalars()) if fetch else result
        session.commit()
    except BaseException:
        session.rollback()
        raise
    return out
