"""The Batch API's job store: files, batches, their request lines, cancellation, expiry, finalisation.

The workers' side (shard leases, recording results) is app/shard_leases.py, re-exported here.

Conventions, as in app/worker_registry.py: every function that writes commits its own unit of work
(rolling back if it raises); each starts with the conditional UPDATE that decides its outcome, so the
decision and the row lock come together (and SQLite takes its write lock first instead of upgrading
from a read). Readers do not commit and reload the rows they return.

A batch's status:

    validating ──start_batch──▶ in_progress ──claim_finalization──▶ finalizing ──complete_finalization──▶ completed
      │                           │  │       (nothing pending)
      │                           │  └─begin_expiry──▶ finalizing, expired_at set ──claim_finalization,
      │                           │     (pending → "expired")                       complete_finalization──▶ expired
      │                           └─cancel_batch──▶ cancelling ──claim_finalization──▶ cancelling, claimed
      │                                              (no shard holds a live lease;      ──complete_finalization──▶ cancelled
      │                                               pending → "cancelled")
      ├─fail_validation──▶ failed
      ├─cancel_batch─────▶ cancelled   (nothing had run: no request rows, no files, zero counts)
      └─begin_expiry─────▶ expired     (likewise)

- validating: the gateway is reading the input file; add_requests then start_batch (or fail_validation).
  add_requests only writes into a validating batch (replacing rows an interrupted validation left), and
  a validating batch that is cancelled or expires goes straight to cancelled / expired with no request
  rows, no files and zero counts: nothing had run.
- in_progress: workers lease its shards. Once no request is pending, claim_finalization moves it to
  finalizing.
- cancelling: workers notice (batch_status) and stop. Once no shard holds a live lease, the batch is
  ready; claim_finalization closes its pending requests as "cancelled" (the status stays "cancelling"
  for API clients until the files are written).
- begin_expiry (expires_at passed): in_progress goes to finalizing at once, with expired_at set and
  pending requests closed as "expired"; results still in flight are dropped (record_result only writes
  pending requests).
- finalizing or cancelling with a finalizer claim older than stale_after_s: the finalizer died; the
  batch is ready again and another process claims it.
- completed, expired, cancelled, failed are final; counts_* are frozen then (live counts are computed).

The finalizer's loop:

    for batch in batches_ready_to_finalize(session):
        if not claim_finalization(session, batch.id, me):
            continue                                      # another gateway got it
        batch = load_batch(session, batch.id)
        ... write the output and error files from results_in_order(session, batch.id) ...
        if not complete_finalization(session, batch.id, finalizer=me, final_status=final_status_for(batch), ...):
            ... our claim went stale and another finalizer took over: delete the files just written ...
"""
from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any, Literal

from sqlalchemy import (
    ColumnElement,
    and_,
    case,
    delete,
    exists,
    func,
    insert,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Session

from app.db import UTCDateTime, unit_of_work, utcnow
from app.models import (
    BATCH_CANCELLED,
    BATCH_CANCELLING,
    BATCH_COMPLETED,
    BATCH_EXPIRED,
    BATCH_FAILED,
    BATCH_FINALIZING,
    BATCH_IN_PROGRESS,
    BATCH_VALIDATING,
    REQUEST_CANCELLED,
    REQUEST_COMPLETED,
    REQUEST_EXPIRED,
    REQUEST_FAILED,
    REQUEST_PENDING,
    SHARD_QUEUED,
    SHARD_RUNNING,
    Batch,
    BatchRequest,
    BatchShard,
    File,
)

# The workers' side lives in app/shard_leases.py; re-exported so callers have one import path.
from app.shard_leases import (  # noqa: F401
    ClaimOutcome,
    claim_shard,
    expired_leases,
    finish_shard,
    pending_requests,
    queued_shards,
    record_result,
    record_results,
    release_shard,
    renew_shard,
    requeue_shard,
)

CANCELLED_ERROR = {"code": "batch_cancelled", "message": "This request was not executed: the batch was cancelled."}
EXPIRED_ERROR = {
    "code": "batch_expired",
    "message": "This request could not be executed before the completion window expired.",
}
FINAL_STATUSES = frozenset({BATCH_COMPLETED, BATCH_CANCELLED, BATCH_EXPIRED})
# The API's request_counts.failed counts every request that did not complete.
NOT_COMPLETED = (REQUEST_FAILED, REQUEST_CANCELLED, REQUEST_EXPIRED)
REQUEST_FIELDS = ("line", "custom_id", "request_id", "shard", "model", "body")
_INSERT_CHUNK = 1000
_ZERO_COUNTS = {"counts_total": 0, "counts_completed": 0, "counts_failed": 0}


# --- files --------------------------------------------------------------------------------------


def create_file(
    session: Session, *, file_id: str, owner: str | None, purpose: str, filename: str, size: int,
    now: dt.datetime | None = None,
) -> File:
    file = File(id=file_id, owner=owner, purpose=purpose, filename=filename, bytes=size, created_at=now or utcnow())
    with unit_of_work(session):
        session.add(file)
    return file


def get_file(session: Session, file_id: str, owner: str | None) -> File | None:
    """The file if it belongs to owner (None is an owner too: the open API's)."""
    stmt = select(File).where(File.id == file_id, _owned_by(File.owner, owner))
    return session.scalars(stmt.execution_options(populate_existing=True)).one_or_none()


def list_files(
    session: Session, owner: str | None, *, purpose: str | None = None, after: str | None = None,
    limit: int = 20, order: Literal["asc", "desc"] = "desc",
) -> list[File]:
    """The owner's files by (created_at, id) in the given order, those after the file `after` in it."""
    if order not in ("asc", "desc"):
        raise ValueError(f"order must be 'asc' or 'desc', not {order!r}")
    stmt = select(File).where(_owned_by(File.owner, owner))
    if purpose is not None:
        stmt = stmt.where(File.purpose == purpose)
    return _page(session, stmt, File, owner, after, limit, descending=order == "desc")


def delete_file(session: Session, file_id: str, owner: str | None) -> File | None:
    """Delete the owner's file row; returns it (so the caller can delete its bytes), None if there was none."""
    stmt = delete(File).where(File.id == file_id, _owned_by(File.owner, owner)).returning(File)
    with unit_of_work(session):
        deleted = session.scalars(stmt).one_or_none()
    return deleted


# --- batches ------------------------------------------------------------------------------------


def create_batch(
    session: Session, *, batch_id: str, owner: str | None, endpoint: str, input_file_id: str,
    completion_window: str, metadata: dict[str, Any] | None, expires_at: dt.datetime,
    now: dt.datetime | None = None,
) -> Batch:
    """A new batch, validating."""
    batch = Batch(
        id=batch_id, owner=owner, endpoint=endpoint, input_file_id=input_file_id,
        completion_window=completion_window, status=BATCH_VALIDATING, metadata_=metadata,
        created_at=now or utcnow(), expires_at=expires_at,
    )
    with unit_of_work(session):
        session.add(batch)
    return batch


def get_batch(session: Session, batch_id: str, owner: str | None) -> Batch | None:
    """The batch if it belongs to owner (the API's view)."""
    stmt = select(Batch).where(Batch.id == batch_id, _owned_by(Batch.owner, owner))
    return session.scalars(stmt.execution_options(populate_existing=True)).one_or_none()


def load_batch(session: Session, batch_id: str) -> Batch | None:
    """The batch whoever owns it (for the gateway's background work and the workers)."""
    return session.get(Batch, batch_id, populate_existing=True)


def list_batches(session: Session, owner: str | None, *, after: str | None = None, limit: int = 20) -> list[Batch]:
    """The owner's batches, newest first; with `after`, those older than that batch."""
    stmt = select(Batch).where(_owned_by(Batch.owner, owner))
    return _page(session, stmt, Batch, owner, after, limit, descending=True)


def batch_status(session: Session, batch_id: str) -> str | None:
    """Just the status (workers poll it to notice cancellation and expiry); None if there is no such batch."""
    return session.scalar(select(Batch.status).where(Batch.id == batch_id))


def batch_counts(session: Session, batch: Batch) -> dict[str, int]:
    """The batch's request counts for the API: frozen once final, else computed now."""
    if batch.counts_total is not None:
        return {"total": batch.counts_total, "completed": batch.counts_completed or 0, "failed": batch.counts_failed or 0}
    return request_counts(session, batch.id)


def request_counts(session: Session, batch_id: str) -> dict[str, int]:
    """{"total", "completed", "failed"} of the batch's requests, failed counting cancelled and expired
    ones too; one GROUP BY query."""
    stmt = (
        select(BatchRequest.status, func.count())
        .where(BatchRequest.batch_id == batch_id)
        .group_by(BatchRequest.status)
    )
    by_status: dict[str, int] = {status: n for status, n in session.execute(stmt)}
    return {
        "total": sum(by_status.values()),
        "completed": by_status.get(REQUEST_COMPLETED, 0),
        "failed": sum(by_status.get(s, 0) for s in NOT_COMPLETED),
    }


# --- validation's outcome -----------------------------------------------------------------------


def add_requests(session: Session, batch_id: str, rows: Iterable[dict[str, Any]]) -> int:
    """Insert the batch's request lines, pending (keys: REQUEST_FIELDS), in chunks within one
    transaction: a failure (a duplicate custom_id or line raises IntegrityError) leaves none.

    Only into a validating batch, replacing any rows an interrupted validation left; a batch no
    longer validating (cancelled or expired meanwhile) gets nothing, and 0 is returned.
    """
    with unit_of_work(session):
        # A no-op write that locks the batch's row (SQLite: the database) until commit, so a
        # concurrent cancel_batch or begin_expiry waits for these rows and then deletes them.
        if not _update(session, Batch, Batch.id == batch_id, Batch.status == BATCH_VALIDATING, status=Batch.status):
            return 0
        _delete_requests(session, batch_id)
        inserted = 0
        for chunk in _chunks(rows, _INSERT_CHUNK):
            session.execute(insert(BatchRequest), [
                {**{key: row[key] for key in REQUEST_FIELDS}, "batch_id": batch_id, "status": REQUEST_PENDING}
                for row in chunk
            ])
            inserted += len(chunk)
    return inserted


def start_batch(session: Session, batch_id: str, shards: list[tuple[int, str]], now: dt.datetime | None = None) -> bool:
    """validating → in_progress with its shards (shard number, model) queued, in one transaction.
    False if the batch was no longer validating (cancelled or expired meanwhile, or started by another
    validator); then nothing is written."""
    now = now or utcnow()
    with unit_of_work(session):
        if not _update(session, Batch, Batch.id == batch_id, Batch.status == BATCH_VALIDATING,
                       status=BATCH_IN_PROGRESS, in_progress_at=now):
            return False
        if shards:
            session.execute(insert(BatchShard), [
                dict(batch_id=batch_id, shard=shard, model=model, status=SHARD_QUEUED, attempts=0, updated_at=now)
                for shard, model in shards
            ])
    return True


def fail_validation(session: Session, batch_id: str, errors: list[dict[str, Any]], now: dt.datetime | None = None) -> bool:
    """validating → failed with the errors ({"code","message","param","line"}); its request rows are
    deleted. False if the batch was no longer validating."""
    now = now or utcnow()
    with unit_of_work(session):
        if not _update(session, Batch, Batch.id == batch_id, Batch.status == BATCH_VALIDATING,
                       status=BATCH_FAILED, failed_at=now, errors=errors, **_ZERO_COUNTS):
            return False
        _delete_requests(session, batch_id)
    return True


def validating_batches(session: Session, *, created_before: dt.datetime | None = None) -> list[Batch]:
    """Batches still validating, oldest first (with created_before: only those created before it, so
    a recovering gateway leaves alone the ones being validated right now)."""
    stmt = select(Batch).where(Batch.status == BATCH_VALIDATING)
    if created_before is not None:
        stmt = stmt.where(Batch.created_at < created_before)
    return _all(session, stmt.order_by(Batch.created_at, Batch.id))


# --- dispatch -----------------------------------------------------------------------------------


def shards_of(session: Session, batch_id: str) -> list[BatchShard]:
    stmt = select(BatchShard).where(BatchShard.batch_id == batch_id).order_by(BatchShard.shard)
    return _all(session, stmt)


def mark_dispatched(session: Session, batch_id: str, now: dt.datetime | None = None) -> bool:
    """Record that every shard was sent to the broker; False if it already was (or no such batch)."""
    with unit_of_work(session):
        return _update(session, Batch, Batch.id == batch_id, Batch.dispatched_at.is_(None), dispatched_at=now or utcnow())


def undispatched_batches(session: Session, *, started_before: dt.datetime | None = None) -> list[Batch]:
    """In-progress batches whose shards were never all sent (a gateway died between start_batch and
    mark_dispatched), oldest first; started_before leaves out the ones being dispatched right now.
    Sending a shard twice is harmless: the second claim_shard says "busy" or "done"."""
    stmt = select(Batch).where(Batch.status == BATCH_IN_PROGRESS, Batch.dispatched_at.is_(None))
    if started_before is not None:
        stmt = stmt.where(Batch.in_progress_at < started_before)
    return _all(session, stmt.order_by(Batch.in_progress_at, Batch.id))


# --- cancellation and expiry --------------------------------------------------------------------


def cancel_batch(session: Session, batch_id: str, owner: str | None, now: dt.datetime | None = None) -> Batch | None:
    """in_progress → cancelling; validating → cancelled at once (nothing had run); any other status
    is left as it is. Returns the batch as it is now, None if the owner has no such batch."""
    now = now or utcnow()
    mine = and_(Batch.id == batch_id, _owned_by(Batch.owner, owner))
    with unit_of_work(session):
        if not _update(session, Batch, mine, Batch.status == BATCH_IN_PROGRESS, status=BATCH_CANCELLING, cancelling_at=now):
            if _update(session, Batch, mine, Batch.status == BATCH_VALIDATING, status=BATCH_CANCELLED,
                       cancelling_at=now, cancelled_at=now, **_ZERO_COUNTS):
                _delete_requests(session, batch_id)
    return get_batch(session, batch_id, owner)


def due_for_expiry(session: Session, now: dt.datetime | None = None) -> list[Batch]:
    """Validating or in-progress batches whose completion window has run out (expires_at <= now)."""
    stmt = select(Batch).where(
        Batch.status.in_((BATCH_VALIDATING, BATCH_IN_PROGRESS)), Batch.expires_at <= (now or utcnow())
    )
    return _all(session, stmt.order_by(Batch.expires_at, Batch.id))


def begin_expiry(session: Session, batch_id: str, now: dt.datetime | None = None) -> bool:
    """Expire a batch whose expires_at has passed: in_progress → finalizing with expired_at set and its
    pending requests closed as "expired" (finalisation then ends in "expired"); validating → expired
    at once. False if the batch is not due or not in one of those statuses."""
    now = now or utcnow()
    due = and_(Batch.id == batch_id, Batch.expires_at <= now)
    with unit_of_work(session):
        if _update(session, Batch, due, Batch.status == BATCH_IN_PROGRESS,
                   status=BATCH_FINALIZING, finalizing_at=now, expired_at=now):
            _close_pending(session, batch_id, REQUEST_EXPIRED, EXPIRED_ERROR, now)
            return True
        if not _update(session, Batch, due, Batch.status == BATCH_VALIDATING,
                       status=BATCH_EXPIRED, expired_at=now, **_ZERO_COUNTS):
            return False
        _delete_requests(session, batch_id)
    return True


def close_pending(
    session: Session, batch_id: str, status: str, error: dict[str, Any], now: dt.datetime | None = None
) -> int:
    """Close the batch's pending requests with status (failed, cancelled or expired) and error; returns how many."""
    with unit_of_work(session):
        return _close_pending(session, batch_id, status, error, now or utcnow())


# --- finalisation -------------------------------------------------------------------------------


def batches_ready_to_finalize(
    session: Session, now: dt.datetime | None = None, *, stale_after_s: float = 300
) -> list[Batch]:
    """Batches whose output files can be written now, oldest first: in_progress with nothing pending,
    cancelling with no shard holding a live lease, finalizing (expired) ones, and those whose
    finalizer's claim is older than stale_after_s."""
    stmt = select(Batch).where(_ready_to_finalize(now or utcnow(), stale_after_s))
    return _all(session, stmt.order_by(Batch.created_at, Batch.id))


def claim_finalization(
    session: Session, batch_id: str, finalizer: str, now: dt.datetime | None = None, stale_after_s: float = 300
) -> bool:
    """Become the batch's finalizer, if it is ready (see batches_ready_to_finalize) and nobody holds a
    fresh claim: in_progress → finalizing (finalizing_at); a cancelling batch stays cancelling and its
    pending requests are closed as "cancelled". False if someone else has it or it is not ready."""
    now = now or utcnow()
    starting = Batch.status == BATCH_IN_PROGRESS
    stmt = (
        update(Batch)
        .where(Batch.id == batch_id, _ready_to_finalize(now, stale_after_s))
        .values(
            finalizer=finalizer,
            finalizer_claimed_at=now,
            status=case((starting, BATCH_FINALIZING), else_=Batch.status),
            finalizing_at=case((starting, literal(now, UTCDateTime())), else_=Batch.finalizing_at),
        )
        .returning(Batch.status)
        .execution_options(synchronize_session=False)
    )
    with unit_of_work(session):
        status = session.scalars(stmt).one_or_none()
        if status == BATCH_CANCELLING:
            _close_pending(session, batch_id, REQUEST_CANCELLED, CANCELLED_ERROR, now)
    return status is not None


def final_status_for(batch: Batch) -> str:
    """Where the finalisation of a claimed batch ends: cancelled, expired or completed."""
    if batch.status == BATCH_CANCELLING:
        return BATCH_CANCELLED
    return BATCH_EXPIRED if batch.expired_at is not None else BATCH_COMPLETED


def results_in_order(session: Session, batch_id: str) -> Iterator[BatchRequest]:
    """Every request of the batch by line, streamed 1000 rows at a time (for writing the output
    files). Do not write through this session until the iteration is over."""
    stmt = (
        select(BatchRequest)
        .where(BatchRequest.batch_id == batch_id)
        .order_by(BatchRequest.line)
        .execution_options(yield_per=1000, populate_existing=True)
    )
    yield from session.scalars(stmt)


def complete_finalization(
    session: Session, batch_id: str, *, finalizer: str, final_status: str, output_file_id: str | None,
    error_file_id: str | None, now: dt.datetime | None = None,
) -> bool:
    """Finish the batch in final_status (see final_status_for) with its files, its timestamp
    (completed_at / cancelled_at; expired_at was set by begin_expiry) and its counts frozen, and drop
    the claim. False if finalizer no longer holds the claim (it went stale and another took over): the
    batch is finished exactly once. ValueError if final_status does not fit the batch, or requests are
    still pending."""
    if final_status not in FINAL_STATUSES:
        raise ValueError(f"final_status must be one of {sorted(FINAL_STATUSES)}, not {final_status!r}")
    now = now or utcnow()
    fits = {
        BATCH_COMPLETED: and_(Batch.status == BATCH_FINALIZING, Batch.expired_at.is_(None)),
        BATCH_EXPIRED: and_(Batch.status == BATCH_FINALIZING, Batch.expired_at.is_not(None)),
        BATCH_CANCELLED: Batch.status == BATCH_CANCELLING,
    }[final_status]
    stamp = {BATCH_COMPLETED: {"completed_at": now}, BATCH_CANCELLED: {"cancelled_at": now}}.get(final_status, {})
    with unit_of_work(session):
        if not _update(
            session, Batch, Batch.id == batch_id, Batch.finalizer == finalizer, fits,
            status=final_status, output_file_id=output_file_id, error_file_id=error_file_id,
            finalizer=None, finalizer_claimed_at=None,
            counts_total=_count_requests(batch_id),
            counts_completed=_count_requests(batch_id, REQUEST_COMPLETED),
            counts_failed=_count_requests(batch_id, *NOT_COMPLETED),
            **stamp,
        ):
            holder = session.execute(select(Batch.finalizer, Batch.status).where(Batch.id == batch_id)).one_or_none()
            if holder is not None and holder.finalizer == finalizer:
                raise ValueError(f"batch {batch_id} ({holder.status}) cannot finish as {final_status!r}")
            return False
        if session.scalar(select(_pending_exists(batch_id))):
            raise ValueError(f"batch {batch_id} still has pending requests")  # rolls the update back
    return True


# --- helpers ------------------------------------------------------------------------------------


def _owned_by(column: Any, owner: str | None) -> ColumnElement[bool]:
    return column.is_(None) if owner is None else column == owner


def _update(session: Session, model: Any, *where: Any, **values: Any) -> bool:
    """UPDATE model SET values WHERE where; whether a row matched."""
    stmt = update(model).where(*where).values(**values).execution_options(synchronize_session=False)
    return bool(session.execute(stmt).rowcount)  # type: ignore[attr-defined]


def _all(session: Session, stmt: Any) -> list[Any]:
    return list(session.scalars(stmt.execution_options(populate_existing=True)))


def _page(
    session: Session, stmt: Any, model: type[File] | type[Batch], owner: str | None, after: str | None,
    limit: int, *, descending: bool,
) -> list[Any]:
    """One page of stmt ordered by (created_at, id); with after, the rows past that row's position.
    A cursor the owner cannot see (or one deleted since) gives an empty page."""
    if after is not None:
        cursor = session.execute(
            select(model.created_at, model.id).where(model.id == after, _owned_by(model.owner, owner))
        ).one_or_none()
        if cursor is None:
            return []
        at, cursor_id = cursor
        if descending:
            stmt = stmt.where(or_(model.created_at < at, and_(model.created_at == at, model.id < cursor_id)))
        else:
            stmt = stmt.where(or_(model.created_at > at, and_(model.created_at == at, model.id > cursor_id)))
    keys = (model.created_at.desc(), model.id.desc()) if descending else (model.created_at, model.id)
    return _all(session, stmt.order_by(*keys).limit(limit))


def _chunks(rows: Iterable[Any], size: int) -> Iterator[list[Any]]:
    it = iter(rows)
    while chunk := list(islice(it, size)):
        yield chunk


def _delete_requests(session: Session, batch_id: str) -> None:
    session.execute(
        delete(BatchRequest).where(BatchRequest.batch_id == batch_id).execution_options(synchronize_session=False)
    )


def _close_pending(session: Session, batch_id: str, status: str, error: dict[str, Any], now: dt.datetime) -> int:
    if status not in NOT_COMPLETED:
        raise ValueError(f"pending requests close as one of {NOT_COMPLETED}, not {status!r}")
    stmt = (
        update(BatchRequest)
        .where(BatchRequest.batch_id == batch_id, BatchRequest.status == REQUEST_PENDING)
        .values(status=status, error=error, finished_at=now)
        .execution_options(synchronize_session=False)
    )
    return session.execute(stmt).rowcount  # type: ignore[attr-defined,no-any-return]


def _pending_exists(batch_id: Any) -> Any:
    return exists().where(BatchRequest.batch_id == batch_id, BatchRequest.status == REQUEST_PENDING)


def _count_requests(batch_id: str, *statuses: str) -> Any:
    stmt = select(func.count()).select_from(BatchRequest).where(BatchRequest.batch_id == batch_id)
    if statuses:
        stmt = stmt.where(BatchRequest.status.in_(statuses))
    return stmt.scalar_subquery()


def _ready_to_finalize(now: dt.datetime, stale_after_s: float) -> ColumnElement[bool]:
    live_lease = exists().where(
        BatchShard.batch_id == Batch.id, BatchShard.status == SHARD_RUNNING, BatchShard.lease_expires_at > now
    )
    unclaimed = or_(
        Batch.finalizer.is_(None), Batch.finalizer_claimed_at <= now - dt.timedelta(seconds=stale_after_s)
    )
    return and_(
        unclaimed,
        or_(
            and_(Batch.status == BATCH_IN_PROGRESS, ~_pending_exists(Batch.id)),
            and_(Batch.status == BATCH_CANCELLING, ~live_lease),
            Batch.status == BATCH_FINALIZING,
        ),
    )
