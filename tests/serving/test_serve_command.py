"""`conserve serve`: the whole platform from one command, with no external server."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import openai
import pytest

from app.db import make_engine, make_session_factory
from app.models import Worker
from batch_files import chat_line, read_jsonl, write_jsonl
from stack import MODEL_NAME, REPO, free_port


@pytest.fixture
def served(chat_model_dir, profile_dir, tmp_path):
    port = free_port()
    data_dir = tmp_path / "data"  # a directory serve must create: store, files and broker live there
    database_url = f"sqlite:///{data_dir / 'conserve.db'}"
    env = os.environ | {"CONSERVE_PROFILE_SECONDS": "1", "CONSERVE_PROFILE_CACHE_DIR": str(profile_dir)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "serve", "--model", str(chat_model_dir), "--served-model-name",
         MODEL_NAME, "--port", str(port), "--data-dir", str(data_dir), "--kv-cache-bytes", "4000000"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    try:
        yield proc, database_url
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_prints_its_url_answers_chats_runs_batches_and_shuts_down_cleanly(served, tmp_path):
    proc, database_url = served
    line = proc.stdout.readline()  # the URL line comes once the worker has registered
    match = re.search(r"(http://127\.0\.0\.1:\d+)/v1", line)
    assert match, f"serve printed {line!r}"
    client = openai.OpenAI(base_url=f"{match.group(1)}/v1", api_key="unused", max_retries=0, timeout=30)
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    reply = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hello"}],
                                           max_tokens=4, extra_body={"ignore_eos": True})
    assert reply.usage.completion_tokens == 4

    # A batch through the embedded broker: upload, create, poll to completed, download.
    lines = [chat_line(f"emb-{i}", max_tokens=6) for i in range(40)] + [chat_line("bad", max_tokens=4, messages=[
        {"role": "user", "content": "hello " * 600}])]
    upload = client.files.create(file=write_jsonl(tmp_path / "in.jsonl", lines).open("rb"), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 60
    while (batch := client.batches.retrieve(batch.id)).status not in ("completed", "failed"):
        assert time.monotonic() < deadline, batch
        time.sleep(0.2)
    assert batch.status == "completed" and batch.request_counts.completed == 40
    outputs = read_jsonl(client.files.content(batch.output_file_id).text)
    errors = read_jsonl(client.files.content(batch.error_file_id).text)
    assert sorted(r["custom_id"] for r in outputs + errors) == sorted(line["custom_id"] for line in lines)
    assert [e["custom_id"] for e in errors] == ["bad"]

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    db = make_engine(database_url)
    try:
        with make_session_factory(db)() as s:
            assert [w.status for w in s.query(Worker)] == ["offline"]  # the worker said goodbye
    finally:
        db.dispose()


def test_serve_with_a_missing_model_exits_with_an_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "workers.cli", "serve", "--model", str(tmp_path / "nope"),
                           "--port", str(free_port()), "--database-url", f"sqlite:///{tmp_path / 'db.sqlite'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "does not exist" in proc.stderr
