"""A batch shard on a real engine and a real (SQLite) job store: its results are recorded once each, and a
worker whose engine is full hands a new shard back unclaimed so a worker with idle capacity takes it."""
from __future__ import annotations

import time
from datetime import timedelta

from app.batch_store import add_requests, create_batch, create_file, shards_of, start_batch
from app.db import utcnow
from app.models import BatchRequest
from workers.shard_runner import ShardRunner


def make_batch(sessions, count: int, shard_size: int, max_tokens: int = 4) -> str:
    with sessions() as s:
        create_file(s, file_id="file-" + "0" * 24, owner=None, purpose="batch", filename="in.jsonl", size=1)
        batch = create_batch(s, batch_id="batch_test", owner=None, endpoint="/v1/chat/completions",
                             input_file_id="file-" + "0" * 24, completion_window="24h", metadata=None,
                             expires_at=utcnow() + timedelta(hours=24))
        rows = [{"line": i + 1, "custom_id": f"r{i}", "request_id": f"batch_req_{i}", "shard": i // shard_size,
                 "model": "tiny-chat", "body": {"model": "tiny-chat", "max_tokens": max_tokens, "ignore_eos": True,
                                                "messages": [{"role": "user", "content": "hello"}]}}
                for i in range(count)]
        add_requests(s, batch.id, rows)
        start_batch(s, batch.id, sorted({(r["shard"], "tiny-chat") for r in rows}))
        return batch.id


def test_shard_records_every_result_once_and_leaves_other_shards_alone(host, store_sessions):
    batch_id = make_batch(store_sessions, count=6, shard_size=4)
    sent_back = []
    runner = ShardRunner(host, store_sessions, "w-test", lambda *a: sent_back.append(a), lease_s=30)
    assert runner.run(batch_id, 0) == "done"
    assert runner.run(batch_id, 0) == "done"  # a duplicate task: nothing left to do, nothing rewritten
    with store_sessions() as s:
        rows = s.query(BatchRequest).order_by(BatchRequest.line).all()
        shards = {sh.shard: sh.status for sh in shards_of(s, batch_id)}
    assert [r.status for r in rows] == ["completed"] * 4 + ["pending"] * 2
    assert all(r.response["usage"]["completion_tokens"] == 4 and r.worker_id == "w-test" for r in rows[:4])
    assert shards == {0: "done", 1: "queued"} and sent_back == []


def test_full_engine_hands_a_new_shard_back_unclaimed(host, store_sessions):
    batch_id = make_batch(store_sessions, count=4, shard_size=4)
    # Fill the engine's offline queue far past the runner's depth.
    filler = [host.submit([{"role": "user", "content": "hello"}], {"max_tokens": 400, "ignore_eos": True},
                          "offline") for _ in range(200)]
    try:
        deadline = time.monotonic() + 10
        while host.offline_waiting() < 8:  # the engine counts them at its next step
            assert time.monotonic() < deadline
            time.sleep(0.01)
        sent_back = []
        runner = ShardRunner(host, store_sessions, "w-busy", lambda *a: sent_back.append(a), lease_s=30,
                             poll_s=0.05)
        assert runner.run(batch_id, 0) == "no_room"
        assert sent_back == [(batch_id, 0, "tiny-chat")]
        with store_sessions() as s:
            [shard] = shards_of(s, batch_id)
        assert (shard.status, shard.attempts, shard.worker_id) == ("queued", 0, None)
    finally:
        for stream in filler:
            stream.cancel()
