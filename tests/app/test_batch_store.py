"""The Batch API's job store (app/batch_store.py, app/shard_leases.py) and its migration, on SQLite and PostgreSQL."""
from __future__ import annotations

import datetime as dt
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import event, inspect, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

import app.models  # noqa: F401  (registers the tables)
from app.batch_store import (
    CANCELLED_ERROR,
    EXPIRED_ERROR,
    add_requests,
    batch_counts,
    batch_status,
    batches_ready_to_finalize,
    begin_expiry,
    cancel_batch,
    claim_finalization,
    close_pending,
    complete_finalization,
    create_batch,
    create_file,
    delete_file,
    due_for_expiry,
    fail_validation,
    final_status_for,
    get_batch,
    get_file,
    list_batches,
    list_files,
    load_batch,
    mark_dispatched,
    request_counts,
    results_in_order,
    shards_of,
    start_batch,
    undispatched_batches,
    validating_batches,
)
from app.db import Base, make_engine, make_session_factory
from app.migrate import alembic_config, migrate
from app.models import BatchRequest, Worker
from app.shard_leases import (
    claim_shard,
    expired_leases,
    finish_shard,
    pending_requests,
    record_result,
    record_results,
    release_shard,
    renew_shard,
    requeue_shard,
)
from app.worker_registry import register_worker

T0 = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
BATCH_TABLES = {"files", "batches", "batch_requests", "batch_shards"}
OK = {"id": "chatcmpl-1", "choices": [{"message": {"role": "assistant", "content": "Paris"}}]}


def sec(s: float) -> dt.timedelta:
    return dt.timedelta(seconds=s)


def request_rows(n: int, *, shards: int = 1, model: str = "smollm2") -> list[dict[str, Any]]:
    return [
        dict(line=i, custom_id=f"req-{i}", request_id=f"batch_req_{i:024x}", shard=(i - 1) % shards, model=model,
             body={"model": model, "messages": [{"role": "user", "content": f"question {i}"}]})
        for i in range(1, n + 1)
    ]


def new_batch(session: Session, batch_id: str = "batch_a", *, owner: str | None = "alice", now: dt.datetime = T0,
              expires_at: dt.datetime | None = None) -> None:
    create_batch(
        session, batch_id=batch_id, owner=owner, endpoint="/v1/chat/completions", input_file_id="file-in",
        completion_window="24h", metadata={"job": "nightly"}, expires_at=expires_at or now + dt.timedelta(hours=24),
        now=now,
    )


def started_batch(session: Session, batch_id: str = "batch_a", *, requests: int = 4, shards: int = 2,
                  owner: str | None = "alice", expires_at: dt.datetime | None = None) -> None:
    """A batch past validation: requests spread round-robin over shards, all queued."""
    new_batch(session, batch_id, owner=owner, expires_at=expires_at)
    assert add_requests(session, batch_id, request_rows(requests, shards=shards)) == requests
    assert start_batch(session, batch_id, [(s, "smollm2") for s in range(shards)], now=T0 + sec(1))


def run_shard(session: Session, batch_id: str, shard: int, worker: str, now: dt.datetime) -> None:
    """What a worker does with a shard it claimed: answer every pending request, then finish."""
    for request in pending_requests(session, batch_id, shard):
        assert record_result(session, request.id, status="completed", status_code=200, response=OK,
                             worker_id=worker, now=now)
    assert finish_shard(session, batch_id, shard, worker, now=now)


def statuses(session: Session, batch_id: str) -> dict[str, str]:
    return {r.custom_id: r.status for r in results_in_order(session, batch_id)}


# --- migration ----------------------------------------------------------------------------------


def test_migration_0002_adds_the_batch_tables_and_downgrades_to_0001_keeping_the_workers(database_url: str) -> None:
    config = alembic_config(database_url)
    command.upgrade(config, "0001")
    engine = make_engine(database_url)
    with make_session_factory(engine)() as session:
        register_worker(session, worker_id="w1", url="http://w1", model="smollm2", device="cpu", policy="conserve",
                        slo_ttft_ms=500, slo_tpot_ms=100, hostname="h", pid=1, max_model_len=2048, now=T0)

    command.upgrade(config, "0002")
    assert BATCH_TABLES <= set(inspect(engine).get_table_names())
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0002"
        assert compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata) == []

    command.downgrade(config, "0001")
    inspect(engine).clear_cache()
    tables = set(inspect(engine).get_table_names())
    assert not BATCH_TABLES & tables and "workers" in tables
    with make_session_factory(engine)() as session:
        assert [w.id for w in session.scalars(select(Worker))] == ["w1"]

    migrate(database_url)  # and up again
    assert BATCH_TABLES <= set(inspect(engine).get_table_names())
    engine.dispose()


# --- files --------------------------------------------------------------------------------------


def test_files_are_created_fetched_and_deleted_by_their_owner(session: Session) -> None:
    created = create_file(session, file_id="file-1", owner="alice", purpose="batch", filename="in.jsonl",
                          size=1234, now=T0)
    assert (created.bytes, created.created_at) == (1234, T0)
    session.expunge_all()
    fetched = get_file(session, "file-1", "alice")
    assert fetched is not None and (fetched.purpose, fetched.filename, fetched.bytes) == ("batch", "in.jsonl", 1234)

    deleted = delete_file(session, "file-1", "alice")
    assert deleted is not None and (deleted.id, deleted.bytes) == ("file-1", 1234)  # the caller removes the bytes
    assert get_file(session, "file-1", "alice") is None
    assert delete_file(session, "file-1", "alice") is None


def test_files_list_newest_first_and_page_with_an_after_cursor(session: Session) -> None:
    # Two files share a timestamp: the id breaks the tie, so no page skips or repeats one.
    for i, at in enumerate([T0, T0 + sec(1), T0 + sec(1), T0 + sec(2), T0 + sec(3)]):
        create_file(session, file_id=f"file-{i}", owner="alice", purpose="batch", filename="x", size=1, now=at)
    create_file(session, file_id="file-out", owner="alice", purpose="batch_output", filename="o", size=1, now=T0)

    def ids(files: list[Any]) -> list[str]:
        return [f.id for f in files]

    assert ids(list_files(session, "alice", purpose="batch")) == ["file-4", "file-3", "file-2", "file-1", "file-0"]
    assert ids(list_files(session, "alice", purpose="batch", limit=2)) == ["file-4", "file-3"]
    assert ids(list_files(session, "alice", purpose="batch", after="file-3", limit=2)) == ["file-2", "file-1"]
    assert ids(list_files(session, "alice", purpose="batch", after="file-1", limit=2)) == ["file-0"]
    assert ids(list_files(session, "alice", purpose="batch", after="file-1", order="asc")) == ["file-2", "file-3", "file-4"]
    assert ids(list_files(session, "alice", purpose="batch_output")) == ["file-out"]
    assert len(list_files(session, "alice")) == 6
    assert list_files(session, "alice", after="file-unknown") == []


def test_batches_list_newest_first_and_page_with_an_after_cursor(session: Session) -> None:
    for i, at in enumerate([T0, T0 + sec(1), T0 + sec(1), T0 + sec(2)]):
        new_batch(session, f"batch_{i}", now=at)
    assert [b.id for b in list_batches(session, "alice")] == ["batch_3", "batch_2", "batch_1", "batch_0"]
    assert [b.id for b in list_batches(session, "alice", limit=2)] == ["batch_3", "batch_2"]
    assert [b.id for b in list_batches(session, "alice", after="batch_2", limit=2)] == ["batch_1", "batch_0"]
    assert list_batches(session, "alice", after="batch_0") == []


def test_another_owner_sees_none_of_the_files_and_batches(session: Session) -> None:
    create_file(session, file_id="file-1", owner="alice", purpose="batch", filename="x", size=1, now=T0)
    new_batch(session, "batch_a", owner="alice")
    for stranger in ("mallory", None):  # None: the open API's files are a separate owner too
        assert get_file(session, "file-1", stranger) is None
        assert list_files(session, stranger) == []
        assert list_files(session, stranger, after="file-1") == []
        assert delete_file(session, "file-1", stranger) is None
        assert get_batch(session, "batch_a", stranger) is None
        assert list_batches(session, stranger) == []
        assert cancel_batch(session, "batch_a", stranger, now=T0) is None
    assert get_file(session, "file-1", "alice") is not None
    assert batch_status(session, "batch_a") == "validating"

    create_file(session, file_id="file-open", owner=None, purpose="batch", filename="x", size=1, now=T0)
    assert [f.id for f in list_files(session, None)] == ["file-open"]
    assert get_file(session, "file-open", "alice") is None


# --- validation ---------------------------------------------------------------------------------


def test_new_batch_is_validating_with_its_metadata(session: Session) -> None:
    new_batch(session)
    session.expunge_all()
    batch = get_batch(session, "batch_a", "alice")
    assert batch is not None
    assert (batch.status, batch.metadata_, batch.errors, batch.created_at) == ("validating", {"job": "nightly"}, None, T0)
    assert [b.id for b in validating_batches(session)] == ["batch_a"]
    assert validating_batches(session, created_before=T0) == []  # maybe being validated right now
    assert batch_counts(session, batch) == {"total": 0, "completed": 0, "failed": 0}


def test_add_requests_failing_on_a_duplicate_custom_id_leaves_no_rows(session: Session) -> None:
    new_batch(session)
    rows = request_rows(2500)  # three chunks: the duplicate sits in the last one
    rows[-1]["custom_id"] = "req-7"
    with pytest.raises(IntegrityError):
        add_requests(session, "batch_a", rows)
    assert session.scalar(select(BatchRequest.id).limit(1)) is None
    assert batch_status(session, "batch_a") == "validating"
    assert add_requests(session, "batch_a", request_rows(2500)) == 2500  # the session is still usable
    assert [r.line for r in results_in_order(session, "batch_a")] == list(range(1, 2501))


def test_add_requests_again_replaces_the_rows_of_an_interrupted_validation(session: Session) -> None:
    new_batch(session)
    assert add_requests(session, "batch_a", request_rows(5)) == 5
    assert add_requests(session, "batch_a", request_rows(3)) == 3
    assert request_counts(session, "batch_a") == {"total": 3, "completed": 0, "failed": 0}


def test_failed_validation_records_the_errors_and_drops_the_requests(session: Session) -> None:
    new_batch(session)
    add_requests(session, "batch_a", request_rows(3))
    errors = [{"code": "invalid_json", "message": "Line 2 is not JSON.", "param": None, "line": 2}]
    assert fail_validation(session, "batch_a", errors, now=T0 + sec(1))
    batch = get_batch(session, "batch_a", "alice")
    assert batch is not None and (batch.status, batch.errors, batch.failed_at) == ("failed", errors, T0 + sec(1))
    assert batch_counts(session, batch) == {"total": 0, "completed": 0, "failed": 0}
    assert request_counts(session, "batch_a")["total"] == 0
    assert not fail_validation(session, "batch_a", errors)
    assert not start_batch(session, "batch_a", [(0, "smollm2")])


def test_start_batch_queues_the_shards_and_only_once(session: Session) -> None:
    new_batch(session)
    add_requests(session, "batch_a", request_rows(4, shards=2))
    assert start_batch(session, "batch_a", [(0, "smollm2"), (1, "smollm2")], now=T0 + sec(1))
    assert not start_batch(session, "batch_a", [(0, "smollm2")], now=T0 + sec(2))  # a second validator lost
    batch = load_batch(session, "batch_a")
    assert batch is not None and (batch.status, batch.in_progress_at) == ("in_progress", T0 + sec(1))
    assert [(s.shard, s.status, s.attempts, s.worker_id) for s in shards_of(session, "batch_a")] == [
        (0, "queued", 0, None), (1, "queued", 0, None)
    ]
    assert add_requests(session, "batch_a", request_rows(1)) == 0  # no longer validating: nothing replaced
    assert request_counts(session, "batch_a")["total"] == 4


def test_a_batch_started_but_never_dispatched_is_found_again(session: Session) -> None:
    started_batch(session)  # in_progress_at = T0 + 1 s
    assert [b.id for b in undispatched_batches(session)] == ["batch_a"]
    assert undispatched_batches(session, started_before=T0 + sec(1)) == []  # perhaps being dispatched now
    assert mark_dispatched(session, "batch_a", now=T0 + sec(2))
    assert not mark_dispatched(session, "batch_a", now=T0 + sec(3))
    assert undispatched_batches(session) == []
    assert load_batch(session, "batch_a").dispatched_at == T0 + sec(2)  # type: ignore[union-attr]


# --- the whole lifecycle ------------------------------------------------------------------------


def test_batch_lifecycle_from_validation_to_completed_with_frozen_counts(session: Session) -> None:
    started_batch(session, requests=5, shards=2)
    mark_dispatched(session, "batch_a", now=T0 + sec(2))

    assert claim_shard(session, "batch_a", 0, "w1", lease_s=60, now=T0 + sec(3)) == "claimed"
    assert [r.line for r in pending_requests(session, "batch_a", 0)] == [1, 3, 5]
    run_shard(session, "batch_a", 0, "w1", now=T0 + sec(4))
    assert claim_shard(session, "batch_a", 0, "w2", lease_s=60, now=T0 + sec(5)) == "done"  # a redelivered task
    assert batches_ready_to_finalize(session, now=T0 + sec(5)) == []  # shard 1's requests are pending
    assert not claim_finalization(session, "batch_a", "gw1", now=T0 + sec(5))

    assert claim_shard(session, "batch_a", 1, "w2", lease_s=60, now=T0 + sec(5)) == "claimed"
    [first, second] = pending_requests(session, "batch_a", 1)
    assert record_results(session, [
        dict(request_pk=first.id, status="completed", status_code=200, response=OK, worker_id="w2", now=T0 + sec(6)),
        dict(request_pk=second.id, status="failed", status_code=400,
             error={"code": "invalid_request", "message": "too long"}, worker_id="w2", now=T0 + sec(6)),
    ]) == 2
    assert request_counts(session, "batch_a") == {"total": 5, "completed": 4, "failed": 1}
    assert batches_ready_to_finalize(session, now=T0 + sec(6)) == [load_batch(session, "batch_a")]
    assert finish_shard(session, "batch_a", 1, "w2", now=T0 + sec(7))

    assert claim_finalization(session, "batch_a", "gw1", now=T0 + sec(8))
    assert not claim_finalization(session, "batch_a", "gw2", now=T0 + sec(9))  # exactly one finalizer
    assert batches_ready_to_finalize(session, now=T0 + sec(9)) == []
    batch = load_batch(session, "batch_a")
    assert batch is not None and (batch.status, batch.finalizing_at, batch.finalizer) == ("finalizing", T0 + sec(8), "gw1")
    assert final_status_for(batch) == "completed"

    lines = [(r.line, r.status, r.status_code, r.worker_id) for r in results_in_order(session, "batch_a")]
    assert lines == [(1, "completed", 200, "w1"), (2, "completed", 200, "w2"), (3, "completed", 200, "w1"),
                     (4, "failed", 400, "w2"), (5, "completed", 200, "w1")]
    assert complete_finalization(session, "batch_a", finalizer="gw1", final_status="completed",
                                 output_file_id="file-out", error_file_id="file-err", now=T0 + sec(10))
    assert not complete_finalization(session, "batch_a", finalizer="gw1", final_status="completed",
                                     output_file_id="file-out2", error_file_id=None, now=T0 + sec(11))

    session.expunge_all()
    batch = get_batch(session, "batch_a", "alice")
    assert batch is not None
    assert (batch.status, batch.completed_at, batch.output_file_id, batch.error_file_id, batch.finalizer) == (
        "completed", T0 + sec(10), "file-out", "file-err", None)
    assert (batch.counts_total, batch.counts_completed, batch.counts_failed) == (5, 4, 1)
    assert batch_counts(session, batch) == {"total": 5, "completed": 4, "failed": 1}
    assert batches_ready_to_finalize(session, now=T0 + sec(20)) == []


def test_request_counts_take_one_query(session: Session) -> None:
    started_batch(session, requests=3, shards=1)
    statements: list[str] = []
    engine = session.get_bind()
    listener = lambda conn, cursor, stmt, *args: statements.append(stmt)  # noqa: E731
    event.listen(engine, "before_cursor_execute", listener)
    try:
        counts = request_counts(session, "batch_a")
    finally:
        event.remove(engine, "before_cursor_execute", listener)
    assert counts == {"total": 3, "completed": 0, "failed": 0} and len(statements) == 1


# --- leases -------------------------------------------------------------------------------------


def test_a_running_shard_is_busy_until_its_lease_expires_then_taken_over(session: Session) -> None:
    started_batch(session, requests=2, shards=1)
    assert claim_shard(session, "batch_a", 0, "w1", lease_s=30, now=T0) == "claimed"
    assert claim_shard(session, "batch_a", 0, "w2", lease_s=30, now=T0 + sec(10)) == "busy"
    assert renew_shard(session, "batch_a", 0, "w1", lease_s=30, now=T0 + sec(20))  # now until T0 + 50 s
    assert claim_shard(session, "batch_a", 0, "w2", lease_s=30, now=T0 + sec(40)) == "busy"

    assert claim_shard(session, "batch_a", 0, "w2", lease_s=30, now=T0 + sec(50)) == "claimed"
    [shard] = shards_of(session, "batch_a")
    assert (shard.status, shard.worker_id, shard.attempts, shard.lease_expires_at) == ("running", "w2", 2, T0 + sec(80))
    # The first worker was only slow, not dead: it has lost the shard.
    assert not renew_shard(session, "batch_a", 0, "w1", lease_s=30, now=T0 + sec(51))
    assert not finish_shard(session, "batch_a", 0, "w1")
    assert not release_shard(session, "batch_a", 0, "w1")
    assert shards_of(session, "batch_a")[0].worker_id == "w2"


def test_a_result_recorded_twice_is_written_once(session: Session) -> None:
    started_batch(session, requests=1, shards=1)
    [request] = pending_requests(session, "batch_a", 0)
    assert record_result(session, request.id, status="completed", status_code=200, response=OK, worker_id="w1", now=T0)
    # The shard ran again elsewhere (its lease had run out) and finished the same request differently.
    assert not record_result(session, request.id, status="failed", status_code=500,
                             error={"code": "server_error", "message": "x"}, worker_id="w2", now=T0 + sec(9))
    assert record_results(session, [dict(request_pk=request.id, status="completed", response={"other": 1})]) == 0
    [stored] = results_in_order(session, "batch_a")
    assert (stored.status, stored.response, stored.error, stored.worker_id, stored.finished_at) == (
        "completed", OK, None, "w1", T0)
    with pytest.raises(ValueError, match="pending"):
        record_result(session, request.id, status="pending")


def test_concurrent_claims_of_a_shard_have_exactly_one_winner(session_factory) -> None:
    shards = 12
    with session_factory() as session:
        started_batch(session, requests=shards, shards=shards)
    barrier = threading.Barrier(2, timeout=30)

    def claimer(worker_id: str) -> list[str]:
        outcomes = []
        with session_factory() as session:
            for shard in range(shards):
                barrier.wait()  # both UPDATEs go out together
                outcomes.append(claim_shard(session, "batch_a", shard, worker_id, lease_s=60, now=T0))
        return outcomes

    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(claimer, ["w1", "w2"])
    assert [sorted(pair) for pair in zip(first, second)] == [["busy", "claimed"]] * shards
    with session_factory() as session:
        winners = {s.shard: s.worker_id for s in shards_of(session, "batch_a")}
        assert all(s.attempts == 1 for s in shards_of(session, "batch_a"))
    assert winners == {i: ("w1" if first[i] == "claimed" else "w2") for i in range(shards)}


def test_a_dead_workers_shard_is_requeued_once_and_claimed_again(session: Session) -> None:
    started_batch(session, requests=2, shards=2)
    claim_shard(session, "batch_a", 0, "dead", lease_s=30, now=T0)
    claim_shard(session, "batch_a", 1, "alive", lease_s=30, now=T0)
    renew_shard(session, "batch_a", 1, "alive", lease_s=30, now=T0 + sec(25))
    assert expired_leases(session, now=T0 + sec(29)) == []
    assert [(s.shard, s.worker_id) for s in expired_leases(session, now=T0 + sec(31))] == [(0, "dead")]

    assert requeue_shard(session, "batch_a", 0, now=T0 + sec(31))
    assert not requeue_shard(session, "batch_a", 0, now=T0 + sec(31))  # another gateway recovering too
    assert not requeue_shard(session, "batch_a", 1, now=T0 + sec(31))  # its lease is live
    assert expired_leases(session, now=T0 + sec(31)) == []
    assert claim_shard(session, "batch_a", 0, "w3", lease_s=30, now=T0 + sec(32)) == "claimed"
    assert shards_of(session, "batch_a")[0].attempts == 2


def test_a_released_shard_is_queued_for_the_next_worker(session: Session) -> None:
    started_batch(session, requests=2, shards=1)
    claim_shard(session, "batch_a", 0, "w1", lease_s=30, now=T0)
    assert release_shard(session, "batch_a", 0, "w1", now=T0 + sec(1))
    [shard] = shards_of(session, "batch_a")
    assert (shard.status, shard.worker_id, shard.lease_expires_at) == ("queued", None, None)
    assert claim_shard(session, "batch_a", 0, "w2", lease_s=30, now=T0 + sec(2)) == "claimed"


# --- cancellation -------------------------------------------------------------------------------


def test_cancelled_batch_waits_for_running_shards_then_closes_the_rest_as_cancelled(session: Session) -> None:
    started_batch(session, requests=4, shards=2)
    assert claim_shard(session, "batch_a", 0, "w1", lease_s=30, now=T0 + sec(2)) == "claimed"

    batch = cancel_batch(session, "batch_a", "alice", now=T0 + sec(3))
    assert batch is not None and (batch.status, batch.cancelling_at) == ("cancelling", T0 + sec(3))
    assert batch_status(session, "batch_a") == "cancelling"  # what the worker polls
    assert claim_shard(session, "batch_a", 1, "w2", lease_s=30, now=T0 + sec(4)) == "stopped"
    assert batches_ready_to_finalize(session, now=T0 + sec(4)) == []  # w1 still holds a live lease
    assert not claim_finalization(session, "batch_a", "gw1", now=T0 + sec(4))

    # The worker records what it had finished, then stops.
    first = pending_requests(session, "batch_a", 0)[0]
    assert record_result(session, first.id, status="completed", status_code=200, response=OK, now=T0 + sec(5))
    assert finish_shard(session, "batch_a", 0, "w1", now=T0 + sec(5))
    assert [b.id for b in batches_ready_to_finalize(session, now=T0 + sec(6))] == ["batch_a"]
    assert claim_finalization(session, "batch_a", "gw1", now=T0 + sec(6))

    batch = load_batch(session, "batch_a")
    assert batch is not None and batch.status == "cancelling" and final_status_for(batch) == "cancelled"
    assert statuses(session, "batch_a") == {"req-1": "completed", "req-2": "cancelled", "req-3": "cancelled",
                                            "req-4": "cancelled"}
    assert [r.error for r in results_in_order(session, "batch_a")][1] == CANCELLED_ERROR
    assert cancel_batch(session, "batch_a", "alice", now=T0 + sec(7)).status == "cancelling"  # type: ignore[union-attr]

    assert complete_finalization(session, "batch_a", finalizer="gw1", final_status="cancelled",
                                 output_file_id="file-out", error_file_id="file-err", now=T0 + sec(8))
    batch = get_batch(session, "batch_a", "alice")
    assert batch is not None and (batch.status, batch.cancelled_at) == ("cancelled", T0 + sec(8))
    assert batch_counts(session, batch) == {"total": 4, "completed": 1, "failed": 3}
    assert cancel_batch(session, "batch_a", "alice", now=T0 + sec(9)).status == "cancelled"  # type: ignore[union-attr]


def test_a_cancelled_batch_whose_worker_died_is_finalized_once_the_lease_expires(session: Session) -> None:
    started_batch(session, requests=2, shards=1)
    claim_shard(session, "batch_a", 0, "dead", lease_s=30, now=T0)
    cancel_batch(session, "batch_a", "alice", now=T0 + sec(1))
    assert batches_ready_to_finalize(session, now=T0 + sec(29)) == []
    assert expired_leases(session, now=T0 + sec(31)) == []  # nothing to requeue for a cancelling batch
    assert claim_finalization(session, "batch_a", "gw1", now=T0 + sec(31))
    assert set(statuses(session, "batch_a").values()) == {"cancelled"}


def test_a_batch_cancelled_while_validating_is_cancelled_at_once_with_nothing_to_run(session: Session) -> None:
    new_batch(session)
    add_requests(session, "batch_a", request_rows(3))  # the validator is part-way through
    batch = cancel_batch(session, "batch_a", "alice", now=T0 + sec(1))
    assert batch is not None and (batch.status, batch.cancelled_at) == ("cancelled", T0 + sec(1))
    assert batch_counts(session, batch) == {"total": 0, "completed": 0, "failed": 0}
    # The validator carries on and finds out.
    assert add_requests(session, "batch_a", request_rows(3)) == 0
    assert not start_batch(session, "batch_a", [(0, "smollm2")], now=T0 + sec(2))
    assert request_counts(session, "batch_a")["total"] == 0 and shards_of(session, "batch_a") == []
    assert batches_ready_to_finalize(session, now=T0 + sec(3)) == []


# --- expiry -------------------------------------------------------------------------------------


def test_expired_batch_closes_its_pending_requests_and_ends_expired_with_the_results_it_has(session: Session) -> None:
    started_batch(session, requests=3, shards=1, expires_at=T0 + sec(100))
    new_batch(session, "batch_later", expires_at=T0 + sec(1000))
    claim_shard(session, "batch_a", 0, "w1", lease_s=300, now=T0 + sec(2))
    done, late, _ = pending_requests(session, "batch_a", 0)
    record_result(session, done.id, status="completed", status_code=200, response=OK, now=T0 + sec(50))

    assert due_for_expiry(session, now=T0 + sec(99)) == []
    assert not begin_expiry(session, "batch_a", now=T0 + sec(99))  # not yet
    assert [b.id for b in due_for_expiry(session, now=T0 + sec(100))] == ["batch_a"]
    assert begin_expiry(session, "batch_a", now=T0 + sec(100))
    assert not begin_expiry(session, "batch_a", now=T0 + sec(101))
    assert due_for_expiry(session, now=T0 + sec(101)) == []

    # The worker, still holding a lease, stops: its late result is dropped.
    assert batch_status(session, "batch_a") == "finalizing"
    assert not record_result(session, late.id, status="completed", status_code=200, response=OK, now=T0 + sec(101))
    assert claim_shard(session, "batch_a", 0, "w2", lease_s=30, now=T0 + sec(400)) == "stopped"
    assert statuses(session, "batch_a") == {"req-1": "completed", "req-2": "expired", "req-3": "expired"}
    assert [r.error for r in results_in_order(session, "batch_a")][2] == EXPIRED_ERROR

    assert [b.id for b in batches_ready_to_finalize(session, now=T0 + sec(101))] == ["batch_a"]
    assert claim_finalization(session, "batch_a", "gw1", now=T0 + sec(101))
    batch = load_batch(session, "batch_a")
    assert batch is not None and final_status_for(batch) == "expired"
    with pytest.raises(ValueError, match="cannot finish as 'completed'"):
        complete_finalization(session, "batch_a", finalizer="gw1", final_status="completed",
                              output_file_id=None, error_file_id=None, now=T0 + sec(102))
    assert complete_finalization(session, "batch_a", finalizer="gw1", final_status="expired",
                                 output_file_id="file-out", error_file_id="file-err", now=T0 + sec(102))
    batch = get_batch(session, "batch_a", "alice")
    assert batch is not None and (batch.status, batch.expired_at) == ("expired", T0 + sec(100))
    assert batch_counts(session, batch) == {"total": 3, "completed": 1, "failed": 2}


def test_a_batch_still_validating_when_it_expires_ends_expired_with_no_requests(session: Session) -> None:
    new_batch(session, expires_at=T0 + sec(10))
    add_requests(session, "batch_a", request_rows(2))  # left by a validator that died
    assert [b.id for b in due_for_expiry(session, now=T0 + sec(10))] == ["batch_a"]
    assert begin_expiry(session, "batch_a", now=T0 + sec(10))
    batch = get_batch(session, "batch_a", "alice")
    assert batch is not None and (batch.status, batch.expired_at) == ("expired", T0 + sec(10))
    assert request_counts(session, "batch_a")["total"] == 0
    assert validating_batches(session) == [] and batches_ready_to_finalize(session, now=T0 + sec(11)) == []


# --- finalisation -------------------------------------------------------------------------------


def test_a_stale_finalization_claim_is_taken_over_and_the_old_finalizer_cannot_complete(session: Session) -> None:
    started_batch(session, requests=1, shards=1)
    claim_shard(session, "batch_a", 0, "w1", lease_s=30, now=T0)
    run_shard(session, "batch_a", 0, "w1", now=T0 + sec(1))
    assert claim_finalization(session, "batch_a", "gw1", now=T0 + sec(2), stale_after_s=300)
    assert batches_ready_to_finalize(session, now=T0 + sec(301), stale_after_s=300) == []
    assert not claim_finalization(session, "batch_a", "gw2", now=T0 + sec(301), stale_after_s=300)

    assert [b.id for b in batches_ready_to_finalize(session, now=T0 + sec(302), stale_after_s=300)] == ["batch_a"]
    assert claim_finalization(session, "batch_a", "gw2", now=T0 + sec(302), stale_after_s=300)
    assert not complete_finalization(session, "batch_a", finalizer="gw1", final_status="completed",
                                     output_file_id="file-gw1", error_file_id=None, now=T0 + sec(303))
    assert complete_finalization(session, "batch_a", finalizer="gw2", final_status="completed",
                                 output_file_id="file-gw2", error_file_id=None, now=T0 + sec(304))
    batch = load_batch(session, "batch_a")
    assert batch is not None and (batch.output_file_id, batch.finalizing_at) == ("file-gw2", T0 + sec(2))


def test_finalization_cannot_complete_while_requests_are_pending(session: Session) -> None:
    started_batch(session, requests=2, shards=1, expires_at=T0 + sec(10))
    cancel_batch(session, "batch_a", "alice", now=T0 + sec(2))
    assert claim_finalization(session, "batch_a", "gw1", now=T0 + sec(3))
    # Something reopened a request behind the store's back: the counts would not add up.
    session.execute(text("UPDATE batch_requests SET status = 'pending' WHERE line = 1"))
    session.commit()
    with pytest.raises(ValueError, match="pending"):
        complete_finalization(session, "batch_a", finalizer="gw1", final_status="cancelled",
                              output_file_id=None, error_file_id=None, now=T0 + sec(4))
    assert batch_status(session, "batch_a") == "cancelling"  # nothing was written
    assert close_pending(session, "batch_a", "cancelled", CANCELLED_ERROR, now=T0 + sec(5)) == 1
    assert complete_finalization(session, "batch_a", finalizer="gw1", final_status="cancelled",
                                 output_file_id=None, error_file_id=None, now=T0 + sec(6))


def test_an_empty_in_progress_batch_is_ready_to_finalize_at_once(session: Session) -> None:
    new_batch(session)
    assert start_batch(session, "batch_a", [], now=T0 + sec(1))
    assert claim_finalization(session, "batch_a", "gw1", now=T0 + sec(2))
    assert complete_finalization(session, "batch_a", finalizer="gw1", final_status="completed",
                                 output_file_id=None, error_file_id=None, now=T0 + sec(3))
    batch = load_batch(session, "batch_a")
    assert batch is not None and (batch.status, batch.counts_total) == ("completed", 0)
