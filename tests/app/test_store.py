"""The job store's worker registry and its migrations, on SQLite and PostgreSQL."""
from __future__ import annotations

import datetime as dt
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import delete, event, inspect, select, text
from sqlalchemy.orm import Session

import app.models  # noqa: F401  (registers the tables)
from app.db import Base, UTCDateTime, make_engine, make_session_factory
from app.migrate import MIGRATIONS_DIR, alembic_config, migrate
from app.models import Worker, WorkerSample
from app.worker_registry import (
    UnknownWorkerError,
    alive_workers,
    latest_samples,
    mark_offline,
    mark_stale_workers,
    prune_samples,
    record_heartbeat,
    register_worker,
    samples_since,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
T0 = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
STORE_TABLES = {"workers", "worker_samples", "files", "batches", "batch_requests", "batch_shards"}


def sec(s: float) -> dt.timedelta:
    return dt.timedelta(seconds=s)


def register(session: Session, worker_id: str, *, model: str = "smollm2", now: dt.datetime = T0, **kw: Any) -> Worker:
    args: dict[str, Any] = dict(
        url=f"http://127.0.0.1:9000/{worker_id}", model=model, device="cpu", policy="conserve",
        slo_ttft_ms=500.0, slo_tpot_ms=100.0, hostname="host-a", pid=1234, max_model_len=2048,
    )
    args.update(kw)
    return register_worker(session, worker_id=worker_id, now=now, **args)


def sample(**overrides: Any) -> dict[str, Any]:
    s: dict[str, Any] = dict(
        kv_usage=0.25, checkpoint_usage=0.1, running_online=2, running_offline=5, waiting_online=0,
        waiting_offline=7, busy_fraction=0.9, gpu_utilization=None, ttft_p50=0.05, ttft_p99=0.2,
        tpot_p50=0.02, tpot_p99=0.04, online_tokens_per_s=40.0, offline_tokens_per_s=300.0,
        preemptions=3, layer_yields=11, checkpointed_tokens=512, restored_tokens=256, recomputed_tokens=64,
    )
    s.update(overrides)
    return s


def table_names(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


# --- migrations ---------------------------------------------------------------------------------


def test_migrate_creates_the_tables_on_an_empty_database_and_is_idempotent(database_url: str) -> None:
    migrate(database_url)
    assert STORE_TABLES | {"alembic_version"} <= table_names(database_url)
    migrate(database_url)  # already at head: nothing to do, nothing fails
    engine = make_engine(database_url)
    with engine.connect() as conn:
        head = ScriptDirectory.from_config(alembic_config(database_url)).get_current_head()
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [head]
    engine.dispose()


def test_concurrent_migrations_from_two_processes_both_succeed(database_url: str) -> None:
    code = "import sys; from app.migrate import migrate; migrate(sys.argv[1])"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, database_url], cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    assert STORE_TABLES <= table_names(database_url)


def test_downgrade_to_base_drops_the_tables(database_url: str) -> None:
    migrate(database_url)
    command.downgrade(alembic_config(database_url), "base")
    assert not STORE_TABLES & table_names(database_url)
    migrate(database_url)  # and back up again
    assert STORE_TABLES <= table_names(database_url)


def test_migrations_match_the_models(database_url: str) -> None:
    migrate(database_url)
    engine = make_engine(database_url)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        differences = compare_metadata(context, Base.metadata)
    engine.dispose()
    assert differences == []


def test_sqlite_table_rebuilds_in_later_migrations_keep_referencing_rows(tmp_path: Path) -> None:
    # Future ALTERs on SQLite rebuild the table (batch mode); the rebuild drops the old table, which
    # with foreign keys on would cascade-delete every worker's samples.
    scripts = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, scripts, ignore=shutil.ignore_patterns("__pycache__"))
    (scripts / "versions" / "9999_rebuild.py").write_text(
        "import sqlalchemy as sa\nfrom alembic import op\nrevision = '9999'\ndown_revision = '0001'\n"
        "def upgrade():\n"
        "    with op.batch_alter_table('workers', recreate='always') as batch:\n"
        "        batch.add_column(sa.Column('extra', sa.Integer(), nullable=True))\n"
    )
    url = f"sqlite:///{tmp_path / 'store.db'}"
    config = Config()
    config.set_main_option("script_location", str(scripts))
    config.set_main_option("sqlalchemy.url", url)
    command.upgrade(config, "0001")
    engine = make_engine(url)
    with make_session_factory(engine)() as session:
        register(session, "w1")
        record_heartbeat(session, "w1", sample(), now=T0 + sec(1))
    command.upgrade(config, "9999")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM worker_samples")).scalar() == 1
    engine.dispose()


# --- connections and types ----------------------------------------------------------------------


def test_sqlite_connections_use_wal_a_busy_timeout_and_foreign_keys(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'new_dir' / 'x.db'}")  # the directory is created
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 10000
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    engine.dispose()


def test_plain_postgresql_urls_use_the_psycopg3_driver() -> None:
    engine = make_engine("postgresql://postgres@127.0.0.1:5432/test")
    assert engine.dialect.driver == "psycopg"
    engine.dispose()


def test_datetimes_come_back_timezone_aware_in_utc(session: Session) -> None:
    paris = dt.timezone(dt.timedelta(hours=1))
    register(session, "w1", now=T0.astimezone(paris))
    session.expunge_all()
    worker = session.get(Worker, "w1")
    assert worker is not None
    assert worker.started_at == T0 and worker.started_at.utcoffset() == dt.timedelta(0)


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="naive"):
        UTCDateTime().process_bind_param(dt.datetime(2026, 1, 1), make_engine("sqlite://").dialect)


# --- registration and heartbeats ----------------------------------------------------------------


def test_registered_worker_is_online_since_now(session: Session) -> None:
    worker = register(session, "w1", device="cuda:0")
    assert (worker.status, worker.device, worker.started_at, worker.last_heartbeat) == ("online", "cuda:0", T0, T0)


def test_restarted_worker_re_registers_under_the_same_id(session: Session) -> None:
    register(session, "w1", pid=1)
    record_heartbeat(session, "w1", sample(), now=T0 + sec(1))
    mark_offline(session, "w1")
    worker = register(session, "w1", pid=2, url="http://10.0.0.2:9000", now=T0 + sec(60))
    assert (worker.pid, worker.url, worker.status, worker.started_at) == (2, "http://10.0.0.2:9000", "online", T0 + sec(60))
    assert session.scalars(select(Worker)).all() == [worker]
    assert len(samples_since(session, T0)) == 1  # its history survives the restart


def test_heartbeat_stores_a_sample_and_refreshes_the_worker(session: Session) -> None:
    register(session, "w1")
    mark_offline(session, "w1")
    record_heartbeat(session, "w1", sample(gpu_utilization=0.75), now=T0 + sec(5))
    worker = session.get(Worker, "w1", populate_existing=True)
    assert worker is not None and (worker.status, worker.last_heartbeat) == ("online", T0 + sec(5))
    [stored] = samples_since(session, T0, "w1")
    assert stored.at == T0 + sec(5) and stored.gpu_utilization == 0.75
    assert {k: getattr(stored, k) for k in sample()} == sample(gpu_utilization=0.75)


def test_heartbeat_measurements_left_out_default_to_zero_or_none(session: Session) -> None:
    register(session, "w1")
    record_heartbeat(session, "w1", {"kv_usage": 0.5}, now=T0 + sec(1))
    [stored] = samples_since(session, T0)
    assert (stored.kv_usage, stored.preemptions, stored.ttft_p99) == (0.5, 0, None)


def test_heartbeat_with_unknown_fields_is_rejected(session: Session) -> None:
    register(session, "w1")
    with pytest.raises(ValueError, match="kv_usge"):
        record_heartbeat(session, "w1", sample(kv_usge=0.1))
    with pytest.raises(ValueError, match="worker_id"):
        record_heartbeat(session, "w1", sample(worker_id="w2"))
    assert samples_since(session, T0) == []


def test_heartbeat_from_an_unregistered_worker_raises_unknown_worker_error(session: Session) -> None:
    with pytest.raises(UnknownWorkerError) as info:
        record_heartbeat(session, "ghost", sample())
    assert info.value.worker_id == "ghost"
    # The session is still usable: the worker re-registers and its next heartbeat lands.
    register(session, "ghost")
    record_heartbeat(session, "ghost", sample(), now=T0 + sec(1))
    assert len(samples_since(session, T0, "ghost")) == 1


def test_deleting_a_worker_deletes_its_samples(session: Session) -> None:
    register(session, "w1")
    record_heartbeat(session, "w1", sample(), now=T0 + sec(1))
    session.execute(delete(Worker).where(Worker.id == "w1"))
    session.commit()
    assert session.scalars(select(WorkerSample)).all() == []


# --- liveness -----------------------------------------------------------------------------------


def test_stale_worker_is_marked_offline(session: Session) -> None:
    register(session, "quiet", now=T0)
    register(session, "chatty", now=T0)
    record_heartbeat(session, "chatty", sample(), now=T0 + sec(25))
    assert mark_stale_workers(session, stale_after_s=10, now=T0 + sec(30)) == ["quiet"]
    statuses = dict(session.execute(select(Worker.id, Worker.status)).all())
    assert statuses == {"quiet": "offline", "chatty": "online"}
    assert mark_stale_workers(session, stale_after_s=10, now=T0 + sec(30)) == []  # already offline


def test_alive_workers_filters_by_model_and_freshness(session: Session) -> None:
    register(session, "a1", model="smollm2", now=T0 + sec(20))
    register(session, "a2", model="smollm2", now=T0 + sec(20))
    register(session, "b1", model="llama", now=T0 + sec(20))
    register(session, "dead", model="smollm2", now=T0)  # online in the table, but silent for too long
    register(session, "gone", model="smollm2", now=T0 + sec(20))
    mark_offline(session, "gone")
    now = T0 + sec(25)
    assert [w.id for w in alive_workers(session, stale_after_s=10, now=now)] == ["a1", "a2", "b1"]
    assert [w.id for w in alive_workers(session, "smollm2", stale_after_s=10, now=now)] == ["a1", "a2"]
    assert alive_workers(session, "unknown-model", stale_after_s=10, now=now) == []


# --- the time series ----------------------------------------------------------------------------


def test_latest_samples_returns_the_newest_sample_per_worker_in_one_query(
    session: Session, session_factory
) -> None:
    for worker_id in ("w1", "w2", "silent"):
        register(session, worker_id)
    for i in range(3):
        record_heartbeat(session, "w1", sample(preemptions=i), now=T0 + sec(i + 1))
        record_heartbeat(session, "w2", sample(preemptions=10 + i), now=T0 + sec(i + 1))

    statements: list[str] = []
    engine = session.get_bind()
    listener = lambda conn, cursor, stmt, *args: statements.append(stmt)  # noqa: E731
    event.listen(engine, "before_cursor_execute", listener)
    try:
        latest = latest_samples(session, ["w1", "w2", "silent", "unknown"])
    finally:
        event.remove(engine, "before_cursor_execute", listener)

    assert len(statements) == 1
    assert {k: (s.preemptions, s.at) for k, s in latest.items()} == {
        "w1": (2, T0 + sec(3)),
        "w2": (12, T0 + sec(3)),
    }
    assert latest_samples(session, []) == {}


def test_samples_since_returns_samples_in_time_order(session: Session) -> None:
    register(session, "w1")
    register(session, "w2")
    # Inserted out of time order: ordering must come from `at`, not from insertion.
    record_heartbeat(session, "w2", sample(), now=T0 + sec(3))
    record_heartbeat(session, "w1", sample(), now=T0 + sec(1))
    record_heartbeat(session, "w1", sample(), now=T0 + sec(2))
    record_heartbeat(session, "w1", sample(), now=T0 + sec(4))
    everyone = samples_since(session, T0 + sec(2))
    assert [(s.worker_id, s.at) for s in everyone] == [("w1", T0 + sec(2)), ("w2", T0 + sec(3)), ("w1", T0 + sec(4))]
    assert [s.at for s in samples_since(session, T0, "w1")] == [T0 + sec(1), T0 + sec(2), T0 + sec(4)]


def test_prune_samples_deletes_only_older_samples(session: Session) -> None:
    register(session, "w1")
    for i in range(5):
        record_heartbeat(session, "w1", sample(), now=T0 + sec(i))
    assert prune_samples(session, older_than=T0 + sec(3)) == 3
    assert [s.at for s in samples_since(session, T0)] == [T0 + sec(3), T0 + sec(4)]
    assert prune_samples(session, older_than=T0 + sec(3)) == 0


# --- several processes --------------------------------------------------------------------------


def test_gateway_and_worker_sessions_see_each_others_writes(database_url: str) -> None:
    migrate(database_url)
    # Two engines, as in two processes; the gateway's session stays open throughout, as a
    # long-lived one would, and must not serve stale cached rows.
    gateway_engine, worker_engine = make_engine(database_url), make_engine(database_url)
    with make_session_factory(gateway_engine)() as gateway, make_session_factory(worker_engine)() as worker:
        assert alive_workers(gateway, stale_after_s=10, now=T0) == []

        register(worker, "w1", now=T0)
        [seen] = alive_workers(gateway, stale_after_s=10, now=T0 + sec(1))
        assert seen.last_heartbeat == T0

        record_heartbeat(worker, "w1", sample(preemptions=1), now=T0 + sec(8))
        [seen] = alive_workers(gateway, stale_after_s=10, now=T0 + sec(12))
        assert seen.last_heartbeat == T0 + sec(8)
        assert latest_samples(gateway, ["w1"])["w1"].preemptions == 1

        assert mark_stale_workers(gateway, stale_after_s=10, now=T0 + sec(30)) == ["w1"]
        assert worker.get(Worker, "w1", populate_existing=True).status == "offline"  # type: ignore[union-attr]

        record_heartbeat(worker, "w1", sample(preemptions=2), now=T0 + sec(31))
        assert [w.status for w in alive_workers(gateway, stale_after_s=10, now=T0 + sec(32))] == ["online"]
        assert latest_samples(gateway, ["w1"])["w1"].preemptions == 2
    gateway_engine.dispose()
    worker_engine.dispose()
