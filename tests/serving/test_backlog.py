"""An offline backlog of 10,000 requests is validated, stored and dispatched while online traffic goes on:
every online request is answered, within its TTFT SLO. Figures go to test-artifacts/backlog.json."""
from __future__ import annotations

import json
import threading
import time

import openai
from sqlalchemy import func, select

from app.db import make_engine, make_session_factory
from app.models import Batch, BatchRequest
from batch_files import chat_line, write_jsonl
from browser import ARTIFACTS
from stack import MODEL_NAME
from workers.latency_window import percentile

BACKLOG = 10_000
SLO_TTFT_S = 1.0


def test_ten_thousand_request_backlog_is_dispatched_without_starving_online_traffic(gateway, start_worker,
                                                                                     tmp_path):
    start_worker("w-backlog").wait_registered()
    gateway.wait_for_workers(1)
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0, timeout=30)
    online: list[float] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def chat_forever():
        while not stop.is_set():
            started = time.monotonic()
            try:
                stream = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}],
                                                        max_tokens=8, stream=True, extra_body={"ignore_eos": True})
                first = None
                for chunk in stream:
                    if first is None and chunk.choices and chunk.choices[0].delta.content:
                        first = time.monotonic() - started
                online.append(first)
            except BaseException as exc:  # noqa: BLE001 - any failure is what the test reports
                failures.append(exc)
            time.sleep(0.05)

    chatter = threading.Thread(target=chat_forever)
    chatter.start()
    try:
        time.sleep(1.0)
        baseline = len(online)
        path = write_jsonl(tmp_path / "backlog.jsonl", [chat_line(f"b-{i}", max_tokens=2) for i in range(BACKLOG)])
        uploaded_at = time.monotonic()
        upload = client.files.create(file=path.open("rb"), purpose="batch")
        batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        db = make_engine(gateway.settings.database_url)
        sessions = make_session_factory(db)
        deadline = time.monotonic() + 120
        while True:
            with sessions() as s:
                dispatched = s.scalar(select(Batch.dispatched_at).where(Batch.id == batch.id))
                stored = s.scalar(select(func.count()).select_from(BatchRequest).where(BatchRequest.batch_id == batch.id))
            if dispatched is not None:
                break
            assert time.monotonic() < deadline, "the backlog was never dispatched"
            time.sleep(0.1)
        dispatch_s = time.monotonic() - uploaded_at
        time.sleep(3.0)  # online traffic beside the workers' offline work
        with sessions() as s:
            done = s.scalar(select(func.count()).select_from(BatchRequest).where(
                BatchRequest.batch_id == batch.id, BatchRequest.status == "completed"))
        db.dispose()
        client.batches.cancel(batch.id)
    finally:
        stop.set()
        chatter.join(timeout=30)

    assert stored == BACKLOG
    assert failures == []
    during = online[baseline:]
    assert len(during) >= 10
    ttft_p99 = percentile(during, 99)
    assert ttft_p99 < SLO_TTFT_S
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "backlog.json").write_text(json.dumps({
        "backlog_requests": BACKLOG, "upload_to_dispatched_s": dispatch_s,
        "online_requests_before": baseline, "online_requests_during": len(during),
        "online_ttft_p50_before_s": percentile(online[:baseline], 50),
        "online_ttft_p50_during_s": percentile(during, 50), "online_ttft_p99_during_s": ttft_p99,
        "offline_completed_within_3s_of_dispatch": done}, indent=2))
