"""The worker's internal HTTP endpoint, in process: the app on a real engine, called over ASGI."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from workers.server import NDJSON, create_worker_app

TOKEN = "s3cret-internal"
PROMPT = [5, 6, 7, 8]


def call(app, method: str, path: str, **kwargs) -> httpx.Response:
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://worker") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def generate(app, body, token: str | None = TOKEN, **kwargs) -> httpx.Response:
    headers = {} if token is None else {"x-conserve-internal-token": token}
    if isinstance(body, (bytes, str)):
        return call(app, "POST", "/internal/generate", content=body, headers=headers, **kwargs)
    return call(app, "POST", "/internal/generate", json=body, headers=headers, **kwargs)


def lines(response: httpx.Response) -> list[dict]:
    assert response.text.endswith("\n")
    return [json.loads(line) for line in response.text.splitlines()]


def scrape(app) -> dict[tuple[str, tuple], float]:
    """/metrics as Prometheus reads it: (sample name, sorted labels) -> value."""
    response = call(app, "GET", "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == CONTENT_TYPE_LATEST
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(response.text) for s in f.samples}


def labels(request_class: str, **extra: str) -> tuple:
    return tuple(sorted({"model_name": "tiny-chat", "request_class": request_class, **extra}.items()))


@pytest.fixture
def app(host):
    return create_worker_app(host, internal_token=TOKEN)


def assert_openai_error(response: httpx.Response, status: int, kind: str, message: str = "") -> None:
    assert response.status_code == status
    assert response.json() == {"error": {"message": response.json()["error"]["message"], "type": kind,
                                         "param": None, "code": None}}
    assert message in response.json()["error"]["message"]


# ---- health --------------------------------------------------------------------------------------------------

def test_health_reports_the_served_model_and_its_context(app):
    response = call(app, "GET", "/internal/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "model": "tiny-chat", "max_model_len": 512}


# ---- generate ------------------------------------------------------------------------------------------------

def test_generate_streams_one_json_object_per_line_ending_with_the_finished_event(app):
    response = generate(app, {"prompt": PROMPT, "params": {"max_tokens": 5, "temperature": 0.0,
                                                            "ignore_eos": True}})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith(NDJSON)
    events = lines(response)
    assert len(events) == 5
    assert [e["finished"] for e in events] == [False] * 4 + [True]
    assert events[-1]["finish_reason"] == "length"
    assert events[-1]["completion_tokens"] == 5
    assert events[-1]["prompt_tokens"] == len(PROMPT)


def test_generate_accepts_text_and_chat_messages(app):
    for prompt in ("hello world", [{"role": "user", "content": "what is the capital of france"}]):
        response = generate(app, {"prompt": prompt, "params": {"max_tokens": 2, "ignore_eos": True}})
        assert response.status_code == 200, response.text
        assert lines(response)[-1]["completion_tokens"] == 2


def test_generate_without_params_runs_to_the_end_of_the_context(app, host):
    response = generate(app, {"prompt": PROMPT, "params": {"ignore_eos": True}})
    final = lines(response)[-1]
    assert final["finish_reason"] == "length"
    assert final["completion_tokens"] == host.max_model_len - len(PROMPT)


@pytest.mark.parametrize("body, message", [
    ({"prompt": PROMPT, "params": {"max_tokens": 0}}, "max_tokens"),
    ({"prompt": PROMPT, "params": {"max_tokens": 2, "best_of": 3}}, "unknown sampling parameter"),
    ({"prompt": PROMPT, "params": [1, 2]}, "params must be an object"),
    ({"prompt": PROMPT, "request_class": "batch"}, "request_class"),
    ({"prompt": "", "params": {"max_tokens": 2}}, "empty"),
    ({"prompt": 17}, "prompt must be"),
    ({"params": {"max_tokens": 2}}, "malformed internal request"),
    ([PROMPT], "malformed internal request"),
    (b'{"prompt": [5, 6', "malformed internal request"),
    (b'{"prompt": "caf\xe9"}', "malformed internal request"),  # Latin-1, not UTF-8
])
def test_bad_requests_get_an_openai_shaped_400(app, body, message):
    assert_openai_error(generate(app, body), 400, "invalid_request_error", message)


def test_a_prompt_over_the_context_gets_a_400(app, host):
    response = generate(app, {"prompt": [5] * (host.max_model_len + 3), "params": {}})
    assert_openai_error(response, 400, "invalid_request_error", "context")


@pytest.mark.parametrize("token", [None, "", "wrong-token", TOKEN + "x"])
def test_a_wrong_or_missing_internal_token_gets_a_401(app, token):
    response = generate(app, {"prompt": PROMPT, "params": {"max_tokens": 2}}, token=token)
    assert_openai_error(response, 401, "authentication_error")


def test_the_token_is_checked_before_the_request_is_read(app):
    assert generate(app, b"not json", token="wrong").status_code == 401


def test_without_a_configured_token_no_header_is_needed(host):
    app = create_worker_app(host, internal_token=None)
    response = generate(app, {"prompt": PROMPT, "params": {"max_tokens": 2}}, token=None)
    assert response.status_code == 200
    assert lines(response)[-1]["finished"] is True


def test_health_and_metrics_need_no_token(app):
    assert call(app, "GET", "/internal/health").status_code == 200
    assert call(app, "GET", "/metrics").status_code == 200


# ---- metrics -------------------------------------------------------------------------------------------------

def test_metrics_count_a_served_request_under_its_class(app):
    before = scrape(app)
    assert ("vllm:time_to_first_token_seconds_count", labels("online")) not in before
    generate(app, {"prompt": PROMPT, "params": {"max_tokens": 3, "ignore_eos": True}})
    generate(app, {"prompt": PROMPT, "params": {"max_tokens": 2, "ignore_eos": True}, "request_class": "offline"})
    after = scrape(app)
    assert after[("vllm:time_to_first_token_seconds_count", labels("online"))] == 1
    assert after[("vllm:time_to_first_token_seconds_count", labels("offline"))] == 1
    assert after[("vllm:generation_tokens_total", labels("online"))] == 3
    assert after[("vllm:generation_tokens_total", labels("offline"))] == 2
    assert after[("vllm:request_success_total", labels("online", finished_reason="length"))] == 1


def test_metrics_include_the_engines_state_by_request_class(app):
    samples = scrape(app)
    for cls in ("online", "offline"):
        assert samples[("vllm:num_requests_running", labels(cls))] == 0
        assert samples[("vllm:num_requests_waiting", labels(cls))] == 0
    assert ("vllm:kv_cache_usage_perc", (("model_name", "tiny-chat"),)) in samples


def test_a_refused_request_leaves_no_latency_sample(app):
    generate(app, {"prompt": PROMPT, "params": {"max_tokens": 0}})
    generate(app, {"prompt": PROMPT}, token="wrong")
    assert ("vllm:time_to_first_token_seconds_count", labels("online")) not in scrape(app)


# ---- the gateway going away ----------------------------------------------------------------------------------

async def disconnect_after_first_line(app, spec_version: str) -> list[bytes]:
    """Drive the app as an ASGI server would for a client that hangs up once it has the first line: under ASGI
    2.0-2.3 the server reports http.disconnect; from 2.4 on, sending to the gone client raises OSError."""
    body = json.dumps({"prompt": PROMPT, "params": {"ignore_eos": True}}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": spec_version}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/internal/generate", "raw_path": b"/internal/generate",
             "query_string": b"", "root_path": "",
             "headers": [(b"host", b"worker"), (b"content-type", b"application/json"),
                         (b"x-conserve-internal-token", TOKEN.encode())],
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8101)}
    received: list[bytes] = []
    gone = asyncio.Event()
    sent_request = False

    async def receive():
        nonlocal sent_request
        if not sent_request:
            sent_request = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] != "http.response.body":
            return
        if gone.is_set():
            raise OSError("client disconnected")
        received.append(message["body"])
        if message["body"]:
            gone.set()

    try:
        await app(scope, receive, send)
    except Exception:
        pass  # under 2.4 the disconnect surfaces as an exception, as uvicorn expects
    return received


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
def test_a_gateway_hanging_up_mid_stream_aborts_the_request(app, host, spec_version):
    before = host.engine.stats().generation_tokens_by_class["online"]
    received = asyncio.run(disconnect_after_first_line(app, spec_version))
    assert json.loads(received[0])["finished"] is False
    deadline = time.monotonic() + 10
    while host.engine.stats().num_running["online"] and time.monotonic() < deadline:
        time.sleep(0.005)
    assert host.engine.stats().num_running["online"] == 0
    # Stopped well short of the ~500 tokens the context allows.
    generated = host.engine.stats().generation_tokens_by_class["online"] - before
    assert generated < host.max_model_len - len(PROMPT)
