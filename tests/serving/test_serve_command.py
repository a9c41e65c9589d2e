"""`conserve serve`: the whole platform from one command, with no external server."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import openai
import pytest

from app.db import make_engine, make_session_factory
from app.models import Worker
from stack import MODEL_NAME, REPO, free_port


@pytest.fixture
def served(chat_model_dir, profile_dir, tmp_path):
    port = free_port()
    database_url = f"sqlite:///{tmp_path / 'store' / 'conserve.db'}"  # a directory serve must create
    env = os.environ | {"CONSERVE_PROFILE_SECONDS": "1", "CONSERVE_PROFILE_CACHE_DIR": str(profile_dir)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "serve", "--model", str(chat_model_dir), "--served-model-name",
         MODEL_NAME, "--port", str(port), "--database-url", database_url, "--kv-cache-bytes", "4000000"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    try:
        yield proc, database_url
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_prints_its_url_answers_chats_and_shuts_down_cleanly(served):
    proc, database_url = served
    line = proc.stdout.readline()  # the URL line comes once the worker has registered
    match = re.search(r"(http://127\.0\.0\.1:\d+)/v1", line)
    assert match, f"serve printed {line!r}"
    client = openai.OpenAI(base_url=f"{match.group(1)}/v1", api_key="unused", max_retries=0, timeout=30)
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    reply = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hello"}],
                                           max_tokens=4, extra_body={"ignore_eos": True})
    assert reply.usage.completion_tokens == 4

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
