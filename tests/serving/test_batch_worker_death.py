"""The production shape: PostgreSQL job store, Redis broker (the CI machine's real servers), two worker
processes. One worker is SIGKILLed in the middle of a batch; the other finishes it, and every custom_id
appears exactly once across the output and error files."""
from __future__ import annotations

import time

import openai
import pytest
from sqlalchemy import func, select

from app.db import make_engine, make_session_factory
from app.migrate import migrate
from app.models import BatchRequest, BatchShard
from batch_files import chat_line, read_jsonl, write_jsonl
from postgres_databases import fresh_postgres_database
from stack import GatewayThread, gateway_settings


@pytest.fixture(scope="module")
def database_url():
    """Overrides the serving tests' SQLite store for this module."""
    with fresh_postgres_database() as url:
        migrate(url)
        yield url


def results_by_worker(database_url: str, batch_id: str) -> dict[str | None, int]:
    db = make_engine(database_url)
    try:
        with make_session_factory(db)() as s:
            rows = s.execute(select(BatchRequest.worker_id, func.count()).where(
                BatchRequest.batch_id == batch_id, BatchRequest.status == "completed").group_by(
                BatchRequest.worker_id)).all()
    finally:
        db.dispose()
    return dict(rows)


def shards_of_worker(database_url: str, batch_id: str, worker_id: str, status: str) -> dict[int, int]:
    """shard -> attempts, of the batch's shards last claimed by worker_id and in the given status."""
    db = make_engine(database_url)
    try:
        with make_session_factory(db)() as s:
            return dict(s.execute(select(BatchShard.shard, BatchShard.attempts).where(
                BatchShard.batch_id == batch_id, BatchShard.worker_id == worker_id,
                BatchShard.status == status)).all())
    finally:
        db.dispose()


def shard_states(database_url: str, batch_id: str) -> list[tuple]:
    db = make_engine(database_url)
    try:
        with make_session_factory(db)() as s:
            pending = dict(s.execute(select(BatchRequest.shard, func.count()).where(
                BatchRequest.batch_id == batch_id, BatchRequest.status == "pending").group_by(BatchRequest.shard)).all())
            return [(sh.shard, sh.status, sh.worker_id, sh.attempts, pending.get(sh.shard, 0)) for sh in s.scalars(
                select(BatchShard).where(BatchShard.batch_id == batch_id).order_by(BatchShard.shard))]
    finally:
        db.dispose()


def test_batch_survives_a_worker_killed_mid_batch(database_url, broker_url, files_dir, start_worker, tmp_path):
    # Slow workers (4 sequences at a time) so the batch is still running when one dies.
    doomed = start_worker("w-pg-doomed", "--max-num-seqs", "4")
    survivor = start_worker("w-pg-survivor", "--max-num-seqs", "4")
    doomed.wait_registered()
    survivor.wait_registered()
    gateway = GatewayThread(gateway_settings(database_url, broker_url=broker_url, files_dir=files_dir)).start()
    try:
        client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=30)
        lines = [chat_line(f"job-{i}", max_tokens=48) for i in range(240)]
        upload = client.files.create(file=write_jsonl(tmp_path / "in.jsonl", lines).open("rb"), purpose="batch")
        batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")

        deadline = time.monotonic() + 60
        while results_by_worker(database_url, batch.id).get("w-pg-doomed", 0) < 5 or \
                not shards_of_worker(database_url, batch.id, "w-pg-doomed", "running"):
            assert time.monotonic() < deadline, "the doomed worker never took part"
            time.sleep(0.02)
        doomed.kill()
        orphaned = shards_of_worker(database_url, batch.id, "w-pg-doomed", "running")
        assert orphaned, "the doomed worker finished its shard just before dying; nothing to recover"
        done_before_kill = sum(results_by_worker(database_url, batch.id).values())
        assert done_before_kill < len(lines), "the batch finished before the kill; make it longer"

        deadline = time.monotonic() + 120
        while (batch := client.batches.retrieve(batch.id)).status != "completed":
            assert batch.status in ("validating", "in_progress", "finalizing"), batch
            assert time.monotonic() < deadline, f"batch stuck: {batch.request_counts}, {shard_states(database_url, batch.id)}"
            time.sleep(0.25)
        assert batch.request_counts.completed == len(lines) and batch.request_counts.failed == 0
        outputs = read_jsonl(client.files.content(batch.output_file_id).text)
        assert sorted(o["custom_id"] for o in outputs) == sorted(line["custom_id"] for line in lines)
        assert batch.error_file_id is None
        by_worker = results_by_worker(database_url, batch.id)
        assert by_worker["w-pg-survivor"] > 0 and sum(by_worker.values()) == len(lines)
        # The dead worker's shards were taken over (their lease lapsed) and finished by the survivor.
        recovered = shards_of_worker(database_url, batch.id, "w-pg-survivor", "done")
        assert all(recovered.get(shard, 0) >= attempts + 1 for shard, attempts in orphaned.items()), \
            (orphaned, recovered)
    finally:
        gateway.stop()
