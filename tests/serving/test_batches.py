"""The Batch API through the openai SDK: upload, create, poll, download; cancel; bad uploads."""
from __future__ import annotations

import time

import httpx
import openai
import pytest

from batch_files import chat_line, read_jsonl, write_jsonl
from stack import MODEL_NAME


@pytest.fixture(scope="module")
def client(gateway, start_worker):
    start_worker("w-batch", "--max-num-seqs", "8").wait_registered()
    gateway.wait_for_workers(1)
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=30) as c:
        yield c


def wait_for(client, batch_id: str, statuses: set[str], timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while (batch := client.batches.retrieve(batch_id)).status not in statuses:
        assert time.monotonic() < deadline, f"batch stuck in {batch.status}: {batch}"
        time.sleep(0.2)
    return batch


def test_batch_runs_to_completion_with_every_custom_id_once(client, tmp_path):
    lines = [chat_line(f"req-{i}", max_tokens=4 + i % 5) for i in range(70)]
    lines.append(chat_line("too-long", max_tokens=4, messages=[{"role": "user", "content": "hello " * 600}]))
    upload = client.files.create(file=write_jsonl(tmp_path / "in.jsonl", lines).open("rb"), purpose="batch")
    assert upload.purpose == "batch" and upload.bytes > 0 and upload.filename == "in.jsonl"
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"job": "nightly"})
    assert batch.status == "validating" and batch.metadata == {"job": "nightly"}

    done = wait_for(client, batch.id, {"completed", "failed"})
    assert done.status == "completed", done
    assert done.request_counts.total == 71 and done.request_counts.completed == 70
    assert done.request_counts.failed == 1
    assert done.completed_at >= done.in_progress_at >= done.created_at

    outputs = read_jsonl(client.files.content(done.output_file_id).text)
    errors = read_jsonl(client.files.content(done.error_file_id).text)
    ids = [o["custom_id"] for o in outputs + errors]
    assert sorted(ids) == sorted(line["custom_id"] for line in lines)  # each exactly once
    for out in outputs:
        assert out["response"]["status_code"] == 200 and out["error"] is None
        body = out["response"]["body"]
        assert body["object"] == "chat.completion" and body["model"] == MODEL_NAME
        i = int(out["custom_id"].split("-")[1])
        assert body["usage"]["completion_tokens"] == 4 + i % 5
    [too_long] = errors
    assert too_long["custom_id"] == "too-long" and too_long["response"]["status_code"] == 400
    assert "context" in too_long["response"]["body"]["error"]["message"]

    assert done.id in [b.id for b in client.batches.list(limit=100)]
    assert client.files.retrieve(done.output_file_id).purpose == "batch_output"


def test_cancelled_batch_stops_using_the_engine_within_a_second(client, gateway, tmp_path, start_worker):
    lines = [chat_line(f"c-{i}", max_tokens=200) for i in range(400)]
    upload = client.files.create(file=write_jsonl(tmp_path / "big.jsonl", lines).open("rb"), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    wait_for(client, batch.id, {"in_progress"})
    deadline = time.monotonic() + 30
    while client.batches.retrieve(batch.id).request_counts.completed < 3:
        assert time.monotonic() < deadline
        time.sleep(0.1)

    assert offline_requests_in_engine(gateway) > 0
    cancelled_at = time.monotonic()
    assert client.batches.cancel(batch.id).status == "cancelling"
    while offline_requests_in_engine(gateway) > 0:
        assert time.monotonic() - cancelled_at < 1.0, "offline work still in the engine a second after cancel"
        time.sleep(0.02)

    final = wait_for(client, batch.id, {"cancelled"}, timeout=15)
    counts = final.request_counts
    assert counts.total == 400 and counts.completed >= 3 and counts.completed + counts.failed == 400
    kept = read_jsonl(client.files.content(final.output_file_id).text)
    assert len(kept) == counts.completed  # finished results are kept
    closed = read_jsonl(client.files.content(final.error_file_id).text)
    assert {e["error"]["code"] for e in closed} == {"batch_cancelled"}
    assert len({r["custom_id"] for r in kept + closed}) == 400


def offline_requests_in_engine(gateway) -> int:
    from app.db import make_engine, make_session_factory
    from app.worker_registry import alive_workers

    db = make_engine(gateway.settings.database_url)
    try:
        with make_session_factory(db)() as s:
            urls = [w.url for w in alive_workers(s, stale_after_s=10)]
    finally:
        db.dispose()
    total = 0
    for url in urls:
        for line in httpx.get(f"{url}/metrics").text.splitlines():
            if line.startswith(("vllm:num_requests_running{", "vllm:num_requests_waiting{")) and \
                    'request_class="offline"' in line:
                total += float(line.rsplit(" ", 1)[1])
    return int(total)


def test_batch_past_its_window_expires_keeping_finished_results(client, gateway, tmp_path):
    from sqlalchemy import update

    from app.db import make_engine, make_session_factory, utcnow
    from app.models import Batch

    lines = [chat_line(f"e-{i}", max_tokens=200) for i in range(300)]
    upload = client.files.create(file=write_jsonl(tmp_path / "slow.jsonl", lines).open("rb"), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 30
    while client.batches.retrieve(batch.id).request_counts.completed < 2:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    # 24 hours pass in an instant: the window closes now.
    db = make_engine(gateway.settings.database_url)
    with make_session_factory(db)() as s:
        s.execute(update(Batch).where(Batch.id == batch.id).values(expires_at=utcnow()))
        s.commit()
    db.dispose()

    final = wait_for(client, batch.id, {"expired"}, timeout=15)
    assert final.expired_at is not None
    kept = read_jsonl(client.files.content(final.output_file_id).text)
    expired = read_jsonl(client.files.content(final.error_file_id).text)
    assert len(kept) == final.request_counts.completed >= 2
    assert expired and {e["error"]["code"] for e in expired} == {"batch_expired"}
    assert sorted(r["custom_id"] for r in kept + expired) == sorted(line["custom_id"] for line in lines)
    deadline = time.monotonic() + 2
    while offline_requests_in_engine(gateway) > 0:  # the workers noticed and let go
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_completions_endpoint_runs_in_batches_too(client, tmp_path):
    lines = [{"custom_id": f"t-{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": MODEL_NAME, "prompt": "hello world", "max_tokens": 3, "ignore_eos": True}}
             for i in range(5)]
    upload = client.files.create(file=write_jsonl(tmp_path / "c.jsonl", lines).open("rb"), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h")
    done = wait_for(client, batch.id, {"completed", "failed"})
    assert done.status == "completed" and done.request_counts.completed == 5
    outputs = read_jsonl(client.files.content(done.output_file_id).text)
    assert {o["response"]["body"]["object"] for o in outputs} == {"text_completion"}
    assert all(o["response"]["body"]["usage"]["completion_tokens"] == 3 for o in outputs)
