"""With CONSERVE_API_KEYS set, /v1/* needs one of the keys as a Bearer token; /health and /metrics stay open."""
from __future__ import annotations

import httpx
import openai
import pytest

from stack import MODEL_NAME, GatewayThread, gateway_settings


@pytest.fixture(scope="module")
def keyed_gateway(database_url, broker_url, files_dir, start_worker):
    start_worker("w-keys").wait_registered()
    g = GatewayThread(gateway_settings(database_url, broker_url=broker_url, files_dir=files_dir,
                                       api_keys=["key-one", "key-two"])).start()
    g.wait_for_workers(1)
    yield g
    g.stop()


def test_api_keys_come_from_a_comma_separated_environment_variable(monkeypatch):
    from app.settings import Settings

    monkeypatch.setenv("CONSERVE_API_KEYS", "alpha, beta,,")
    assert Settings().api_keys == ["alpha", "beta"]


@pytest.mark.parametrize("headers", [{}, {"authorization": "Bearer wrong"}, {"authorization": "key-one"},
                                     {"authorization": "Basic a2V5LW9uZQ=="}])
def test_missing_or_wrong_key_is_401(keyed_gateway, headers):
    resp = httpx.get(f"{keyed_gateway.url}/v1/models", headers=headers)
    assert resp.status_code == 401
    assert resp.json()["error"]["code"] == "invalid_api_key"


def test_sdk_with_a_wrong_key_gets_authentication_error(keyed_gateway):
    client = openai.OpenAI(base_url=f"{keyed_gateway.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hello"}])


@pytest.mark.parametrize("key", ["key-one", "key-two"])
def test_each_configured_key_is_accepted(keyed_gateway, key):
    client = openai.OpenAI(base_url=f"{keyed_gateway.url}/v1", api_key=key, max_retries=0)
    resp = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hello"}],
                                          max_tokens=2)
    assert resp.usage.completion_tokens >= 1


def test_health_and_metrics_need_no_key(keyed_gateway):
    assert httpx.get(f"{keyed_gateway.url}/health").status_code == 200
    assert httpx.get(f"{keyed_gateway.url}/metrics").status_code == 200


def test_files_and_batches_are_visible_only_to_the_key_that_made_them(keyed_gateway, tmp_path):
    from batch_files import chat_line, write_jsonl

    one = openai.OpenAI(base_url=f"{keyed_gateway.url}/v1", api_key="key-one", max_retries=0)
    two = openai.OpenAI(base_url=f"{keyed_gateway.url}/v1", api_key="key-two", max_retries=0)
    upload = one.files.create(file=write_jsonl(tmp_path / "mine.jsonl", [chat_line("a")]).open("rb"),
                              purpose="batch")
    batch = one.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")

    assert upload.id not in [f.id for f in two.files.list()]
    assert batch.id not in [b.id for b in two.batches.list()]
    for call in (lambda: two.files.retrieve(upload.id), lambda: two.files.content(upload.id),
                 lambda: two.files.delete(upload.id), lambda: two.batches.retrieve(batch.id),
                 lambda: two.batches.cancel(batch.id),
                 lambda: two.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                            completion_window="24h")):
        with pytest.raises(openai.NotFoundError):
            call()
    assert one.files.retrieve(upload.id).id == upload.id
    assert one.batches.retrieve(batch.id).id == batch.id
