"""The worker's registration and heartbeats, against a real SQLite store brought to the head migration."""
from __future__ import annotations

import datetime as dt
import os
import socket
import time

import pytest
from sqlalchemy import delete

from app.db import utcnow
from app.models import WORKER_OFFLINE, WORKER_ONLINE, Worker
from app.worker_registry import mark_stale_workers, record_heartbeat, samples_since
from workers.heartbeat import Heartbeat, WorkerIdentity

IDENTITY = WorkerIdentity(worker_id="worker-a", url="http://127.0.0.1:8101", model="tiny-chat", device="cpu",
                          policy="conserve", slo_ttft_ms=800.0, slo_tpot_ms=80.0, max_model_len=512)
EPOCH = dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc)


class Readings:
    """A sample source like EngineHost.sample: a new reading per call (kv_usage counts the calls)."""

    def __init__(self, bad_calls: tuple[int, ...] = ()):
        self.calls = 0
        self.bad_calls = bad_calls

    def __call__(self) -> dict:
        self.calls += 1
        reading = {"kv_usage": self.calls / 100, "running_online": 2, "waiting_offline": 5, "ttft_p50": 0.25,
                   "online_tokens_per_s": 42.0}
        if self.calls in self.bad_calls:
            reading["not_a_column"] = 1  # the store refuses the whole sample
        return reading


def worker(sessions, worker_id: str = IDENTITY.worker_id) -> Worker | None:
    with sessions() as s:
        return s.get(Worker, worker_id)


def samples(sessions, worker_id: str = IDENTITY.worker_id) -> list:
    with sessions() as s:
        return samples_since(s, EPOCH, worker_id)


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("condition not reached in time")
        time.sleep(0.01)


def test_register_writes_the_workers_row_online(store_sessions):
    Heartbeat(store_sessions, IDENTITY, Readings()).register()
    w = worker(store_sessions)
    assert (w.url, w.model, w.device, w.policy, w.slo_ttft_ms, w.slo_tpot_ms, w.max_model_len) == \
        (IDENTITY.url, "tiny-chat", "cpu", "conserve", 800.0, 80.0, 512)
    assert w.status == WORKER_ONLINE
    assert (w.hostname, w.pid) == (socket.gethostname(), os.getpid())


def test_start_registers_and_takes_a_baseline_reading_without_storing_it(store_sessions):
    readings = Readings()
    hb = Heartbeat(store_sessions, IDENTITY, readings, interval_s=60)
    hb.start()
    try:
        assert worker(store_sessions).status == WORKER_ONLINE
        assert readings.calls == 1
        assert samples(store_sessions) == []
    finally:
        hb.stop()


def test_each_beat_stores_the_current_reading_and_refreshes_the_heartbeat(store_sessions):
    hb = Heartbeat(store_sessions, IDENTITY, Readings())
    hb.register()
    registered_at = worker(store_sessions).last_heartbeat
    hb.beat()
    hb.beat()
    stored = samples(store_sessions)
    assert [s.kv_usage for s in stored] == [0.01, 0.02]
    last = stored[-1]
    assert (last.running_online, last.waiting_offline, last.ttft_p50, last.online_tokens_per_s) == (2, 5, 0.25, 42.0)
    assert (last.running_offline, last.tpot_p99) == (0, None)  # not measured: the column's default
    assert worker(store_sessions).last_heartbeat >= registered_at


def test_a_beat_stores_the_engine_hosts_own_sample(store_sessions, host):
    """The real pairing in a worker: EngineHost.sample reports only fields the store has columns for."""
    hb = Heartbeat(store_sessions, IDENTITY, host.sample)
    hb.register()
    host.sample()
    hb.beat()
    [stored] = samples(store_sessions)  # record_heartbeat refuses a sample with a key it has no column for
    stats = host.engine.stats()
    assert (stored.preemptions, stored.layer_yields, stored.recomputed_tokens) == \
        (stats.num_preemptions, stats.layer_yields, stats.recomputed_tokens)
    assert (stored.running_online, stored.running_offline) == (0, 0)
    assert stored.gpu_utilization is None


def test_a_beat_after_the_workers_row_was_deleted_registers_again(store_sessions):
    hb = Heartbeat(store_sessions, IDENTITY, Readings())
    hb.register()
    hb.beat()
    with store_sessions() as s:  # a database reset, or a gateway pruning the worker
        s.execute(delete(Worker).where(Worker.id == IDENTITY.worker_id))
        s.commit()
    assert worker(store_sessions) is None

    hb.beat()
    w = worker(store_sessions)
    assert w is not None and w.status == WORKER_ONLINE and w.url == IDENTITY.url
    # The deleted row took its samples with it; the beat that re-registered stored its own.
    assert [s.kv_usage for s in samples(store_sessions)] == [0.02]


def test_a_beat_brings_a_worker_marked_stale_back_online(store_sessions):
    hb = Heartbeat(store_sessions, IDENTITY, Readings())
    hb.register()
    with store_sessions() as s:  # what a gateway does to a worker silent for too long
        assert mark_stale_workers(s, stale_after_s=1, now=utcnow() + dt.timedelta(seconds=5)) == ["worker-a"]
    assert worker(store_sessions).status == WORKER_OFFLINE
    hb.beat()
    assert worker(store_sessions).status == WORKER_ONLINE


def test_the_first_beat_prunes_samples_older_than_the_retention(store_sessions):
    hb = Heartbeat(store_sessions, IDENTITY, Readings(), retention_s=3600)
    hb.register()
    with store_sessions() as s:
        record_heartbeat(s, IDENTITY.worker_id, {"kv_usage": 0.9}, now=utcnow() - dt.timedelta(hours=2))
        record_heartbeat(s, IDENTITY.worker_id, {"kv_usage": 0.8}, now=utcnow() - dt.timedelta(minutes=30))
    hb.beat()
    assert [s.kv_usage for s in samples(store_sessions)] == [0.8, 0.01]


def test_stop_marks_the_worker_offline(store_sessions):
    hb = Heartbeat(store_sessions, IDENTITY, Readings(), interval_s=60)
    hb.start()
    hb.stop()
    assert worker(store_sessions).status == WORKER_OFFLINE


def test_stop_leaves_other_workers_alone(store_sessions):
    other = Heartbeat(store_sessions, WorkerIdentity(**{**vars(IDENTITY), "worker_id": "worker-b"}), Readings())
    other.register()
    hb = Heartbeat(store_sessions, IDENTITY, Readings())
    hb.register()
    hb.stop()
    assert worker(store_sessions, "worker-b").status == WORKER_ONLINE


def test_started_heartbeat_beats_every_interval_until_stopped(store_sessions):
    hb = Heartbeat(store_sessions, IDENTITY, Readings(), interval_s=0.02)
    hb.start()
    try:
        wait_until(lambda: len(samples(store_sessions)) >= 3)
    finally:
        hb.stop()
    assert not hb._thread.is_alive()
    assert worker(store_sessions).status == WORKER_OFFLINE
    count = len(samples(store_sessions))
    time.sleep(0.1)
    assert len(samples(store_sessions)) == count


def test_a_failed_beat_is_logged_and_the_next_one_goes_through(store_sessions, caplog):
    # Call 1 is start()'s baseline; the first beat (call 2) carries a field the store refuses.
    readings = Readings(bad_calls=(2,))
    hb = Heartbeat(store_sessions, IDENTITY, readings, interval_s=0.02)
    hb.start()
    try:
        wait_until(lambda: len(samples(store_sessions)) >= 2)
    finally:
        hb.stop()
    assert [s.kv_usage for s in samples(store_sessions)][:2] == [0.03, 0.04]
    assert "heartbeat to the job store failed" in caplog.text
