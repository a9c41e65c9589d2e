"""Bad requests get a 4xx in OpenAI's error shape, and the gateway keeps serving afterwards."""
from __future__ import annotations

import httpx
import pytest

from stack import MODEL_NAME


@pytest.fixture(scope="module")
def api(gateway, start_worker):
    # A short context, so "prompt over the context" needs no long prompt.
    start_worker("w-bad-input", "--max-model-len", "64").wait_registered()
    gateway.wait_for_workers(1)
    with httpx.Client(base_url=f"{gateway.url}/v1", timeout=30) as client:
        yield client


def chat(**fields):
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4} | fields


def assert_openai_error(resp: httpx.Response, status: int, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param
    return error


@pytest.mark.parametrize("body, param", [
    (chat(max_tokens="ten"), "max_tokens"),
    (chat(temperature=True), "temperature"),
    (chat(messages="hello"), "messages"),
    ({"model": MODEL_NAME}, "messages"),
    (chat(messages=[]), "messages"),
    (chat(messages=[{"role": "user", "content": ""}]), "messages"),
    (chat(messages=[{"role": "user", "content": "   "}]), "messages"),
    (chat(messages=[{"role": "wizard", "content": "hi"}]), "messages"),
    (chat(max_tokens=0), "max_tokens"),
    (chat(n=2), "n"),
    (chat(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
    (chat(frobnicate=1), "frobnicate"),
    (chat(stream_options={"include_usage": True}), "stream_options"),
])
def test_invalid_chat_requests_are_400_naming_the_parameter(api, body, param):
    error = assert_openai_error(api.post("/chat/completions", json=body), 400, param)
    assert error["type"] == "invalid_request_error"


def test_malformed_json_is_400(api):
    resp = api.post("/chat/completions", content=b'{"model": "x", "messages": [', headers={"content-type": "application/json"})
    assert "JSON" in assert_openai_error(resp, 400)["message"]


def test_unknown_model_is_404_model_not_found(api):
    error = assert_openai_error(api.post("/chat/completions", json=chat(model="gpt-9")), 404, "model")
    assert error["code"] == "model_not_found"
    assert_openai_error(api.get("/models/gpt-9"), 404, "model")


def test_prompt_over_the_context_is_400_from_the_worker(api):
    long = " ".join(["hello world"] * 40)
    error = assert_openai_error(api.post("/chat/completions", json=chat(messages=[{"role": "user", "content": long}])), 400)
    assert "context" in error["message"]
    error = assert_openai_error(api.post("/completions", json={"model": MODEL_NAME, "prompt": long, "max_tokens": 2}), 400)
    assert "context" in error["message"]


def test_token_ids_outside_the_vocabulary_are_400(api):
    resp = api.post("/completions", json={"model": MODEL_NAME, "prompt": [5, 100000], "max_tokens": 2})
    assert_openai_error(resp, 400)


def test_unknown_route_and_wrong_method_keep_the_shape(api):
    assert_openai_error(api.get("/nothing-here"), 404)
    assert_openai_error(api.get("/chat/completions"), 405)


def test_gateway_keeps_serving_after_bad_requests(api):
    for _ in range(3):
        api.post("/chat/completions", content=b"not json", headers={"content-type": "application/json"})
        api.post("/chat/completions", json=chat(max_tokens=-1))
    resp = api.post("/chat/completions", json=chat())
    assert resp.status_code == 200
    assert resp.json()["usage"]["completion_tokens"] >= 1
