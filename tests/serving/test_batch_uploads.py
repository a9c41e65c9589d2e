"""Bad batch uploads get clear errors: at upload (size, empty, not multipart) or, like OpenAI, as a failed
batch whose `errors` name the line."""
from __future__ import annotations

import time

import httpx
import openai
import pytest

from batch_files import chat_line, write_jsonl
from stack import GatewayThread, gateway_settings

LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def client(database_url, broker_url, files_dir):
    # No worker needed: validation happens on the gateway.
    g = GatewayThread(gateway_settings(database_url, broker_url=broker_url, files_dir=files_dir,
                                       max_upload_bytes=LIMIT)).start()
    with openai.OpenAI(base_url=f"{g.url}/v1", api_key="unused", max_retries=0, timeout=30) as c:
        yield c
    g.stop()


def create_from(client, path):
    upload = client.files.create(file=path.open("rb"), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 20
    while (batch := client.batches.retrieve(batch.id)).status == "validating":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return batch


@pytest.mark.parametrize("lines, code, line", [
    (["not json at all"], "invalid_json_line", 1),
    ([chat_line("a"), chat_line("b"), chat_line("a")], "duplicate_custom_id", 3),
    ([chat_line("a"), chat_line("b") | {"url": "/v1/embeddings"}], "mismatched_url", 2),
    ([chat_line("a") | {"method": "GET"}], "invalid_method", 1),
    ([{"method": "POST", "url": "/v1/chat/completions", "body": {}}], "missing_custom_id", 1),
    ([chat_line("a", max_tokens=0)], "invalid_request", 1),
    ([chat_line("a", stream=True)], "invalid_request", 1),
])
def test_invalid_lines_fail_the_batch_naming_the_line(client, tmp_path, lines, code, line):
    batch = create_from(client, write_jsonl(tmp_path / "in.jsonl", lines))
    assert batch.status == "failed" and batch.failed_at is not None
    first = batch.errors.data[0]
    assert (first.code, first.line) == (code, line), first
    assert first.message
    assert batch.request_counts.total == 0


def test_file_over_the_size_limit_is_413_and_leaves_nothing(client, tmp_path, files_dir):
    before = set(files_dir.iterdir())
    big = write_jsonl(tmp_path / "big.jsonl", [chat_line(f"r{i}") for i in range(LIMIT // 100)])
    assert big.stat().st_size > LIMIT
    with pytest.raises(openai.APIStatusError) as info:
        client.files.create(file=big.open("rb"), purpose="batch")
    assert info.value.status_code == 413 and info.value.body["code"] == "file_too_large"
    assert set(files_dir.iterdir()) == before


def test_empty_file_and_wrong_purpose_are_400(client, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(openai.BadRequestError, match="empty"):
        client.files.create(file=empty.open("rb"), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=write_jsonl(tmp_path / "x.jsonl", [chat_line("a")]).open("rb"), purpose="fine-tune")


def test_upload_that_is_not_multipart_is_400(client):
    resp = httpx.post(f"{client.base_url}files", content=b"{}", headers={"content-type": "application/json"})
    assert resp.status_code == 400 and "multipart" in resp.json()["error"]["message"]


def test_unknown_file_and_batch_ids_are_404(client):
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-0123456789abcdef01234567", endpoint="/v1/chat/completions",
                              completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve("../../etc/passwd")
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")


def test_uploaded_file_round_trips_lists_and_deletes(client, tmp_path):
    path = write_jsonl(tmp_path / "keep.jsonl", [chat_line("a"), chat_line("b")])
    upload = client.files.create(file=path.open("rb"), purpose="batch")
    assert client.files.content(upload.id).content == path.read_bytes()
    assert upload.id in [f.id for f in client.files.list()]
    assert client.files.delete(upload.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(upload.id)
