"""Online requests spread over the workers of a model; a client that goes away frees its engine slot."""
from __future__ import annotations

import concurrent.futures
import re
import time

import httpx
import openai
import pytest

from stack import MODEL_NAME, GatewayThread, gateway_settings, save_tiny_chat_model

# Streams these tests hold open or abandon must still be generating when the test acts on them. At the
# usual 512-token context the tiny model streams 480 tokens in about 1.3 s, and on a loaded CI machine the
# request meant to be refused took 2 s, as long as a whole generation: a held stream had already ended and
# freed its slot. 3,000 tokens take several seconds; a stream the test closes is aborted long before its end.
LONG_STREAM_TOKENS = 3000


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    return save_tiny_chat_model(tmp_path_factory.mktemp("long-context-chat"), context=2 * LONG_STREAM_TOKENS)


@pytest.fixture(scope="module")
def two_workers(gateway, start_worker):
    workers = [start_worker("w-route-a"), start_worker("w-route-b")]
    for w in workers:
        w.wait_registered()
    gateway.wait_for_workers(2)
    return workers


def online_tokens_generated(workers) -> float:
    """Online tokens the workers' engines sampled, from their /metrics."""
    total = 0.0
    for w in workers:
        for line in httpx.get(f"{w.url}/metrics").text.splitlines():
            if line.startswith("conserve:generation_tokens_by_class_total{") and 'request_class="online"' in line:
                total += float(line.rsplit(" ", 1)[1])
    return total


def wait_for_abort(workers, aborted_before: float, tokens_before: float, max_tokens: int) -> None:
    """The abandoned request ends as aborted on a worker, well before it could have run to max_tokens."""
    deadline = time.monotonic() + 10
    while sum(finished_requests(w.url, "abort") for w in workers) == aborted_before:
        assert time.monotonic() < deadline, "the worker never aborted the abandoned request"
        time.sleep(0.05)
    time.sleep(0.5)  # any token still being generated would show now
    assert online_tokens_generated(workers) - tokens_before < max_tokens


def finished_requests(worker_url: str, reason: str | None = None) -> float:
    """Requests the worker's engine finished (with `reason`, if given), from its /metrics."""
    text = httpx.get(f"{worker_url}/metrics").text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("vllm:request_success_total{") and (reason is None or f'finished_reason="{reason}"' in line):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_concurrent_requests_use_both_workers(gateway, two_workers):
    before = {w.worker_id: finished_requests(w.url) for w in two_workers}
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0, timeout=60)

    def ask(i: int) -> int:
        resp = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hello"}],
                                              max_tokens=24, extra_body={"ignore_eos": True})
        return resp.usage.completion_tokens

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert list(pool.map(ask, range(16))) == [24] * 16
    served = {w.worker_id: finished_requests(w.url) - before[w.worker_id] for w in two_workers}
    assert sum(served.values()) == 16
    # Least-loaded routing with 8 in flight: each worker carries a real share, not a stray request.
    assert min(served.values()) >= 4, served


def test_client_leaving_a_stream_aborts_the_request_on_the_worker(gateway, two_workers):
    aborted_before = sum(finished_requests(w.url, "abort") for w in two_workers)
    tokens_before = online_tokens_generated(two_workers)
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": LONG_STREAM_TOKENS, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, timeout=30) as resp:
        lines = resp.iter_lines()
        assert next(lines).startswith("data: ")
    wait_for_abort(two_workers, aborted_before, tokens_before, LONG_STREAM_TOKENS)


def test_client_leaving_a_non_streaming_request_aborts_it_too(gateway, two_workers):
    aborted_before = sum(finished_requests(w.url, "abort") for w in two_workers)
    tokens_before = online_tokens_generated(two_workers)
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": LONG_STREAM_TOKENS, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=httpx.Timeout(5, read=0.1))
    wait_for_abort(two_workers, aborted_before, tokens_before, LONG_STREAM_TOKENS)


def test_metrics_expose_request_histograms_and_worker_gauges(gateway, two_workers):
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0)
    list(client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hello"}],
                                        max_tokens=5, stream=True, extra_body={"ignore_eos": True}))
    time.sleep(1.2)  # a heartbeat (every 0.5 s here) carries the latest worker state
    text = httpx.get(f"{gateway.url}/metrics").text
    labels = f'model_name="{MODEL_NAME}",request_class="online"'
    for histogram in ("vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
                      "vllm:e2e_request_latency_seconds"):
        count = re.search(rf'^{re.escape(histogram)}_count\{{{labels}\}} (\S+)$', text, re.M)
        assert count and float(count.group(1)) >= 1, histogram
    assert re.search(r'^vllm:generation_tokens_total\{' + labels + r'\} (\S+)$', text, re.M)
    for w in two_workers:
        assert re.search(rf'^vllm:kv_cache_usage_perc\{{model_name="{MODEL_NAME}",worker="{w.worker_id}"\}} ', text, re.M)
        assert re.search(rf'^vllm:num_requests_running\{{model_name="{MODEL_NAME}",request_class="offline",'
                         rf'worker="{w.worker_id}"\}} ', text, re.M)
        assert re.search(rf'^vllm:num_preemptions_total\{{model_name="{MODEL_NAME}",worker="{w.worker_id}"\}} ', text, re.M)
    assert re.search(rf'^conserve:workers_alive\{{model_name="{MODEL_NAME}"\}} 2\.0$', text, re.M)
    # Each worker's own endpoint has the engine's view, offline class included.
    worker_text = httpx.get(f"{two_workers[0].url}/metrics").text
    assert 'vllm:num_requests_waiting{model_name="tiny-chat",request_class="offline"}' in worker_text
    assert "conserve:checkpointed_tokens_total" in worker_text


def test_requests_beyond_every_workers_capacity_get_429_at_once(database_url, broker_url, files_dir, two_workers):
    g = GatewayThread(gateway_settings(database_url, broker_url=broker_url, files_dir=files_dir,
                                       max_inflight_per_worker=1)).start()
    try:
        g.wait_for_workers(2)
        body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hello"}],
                "max_tokens": LONG_STREAM_TOKENS, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{g.url}/v1/chat/completions", json=body, timeout=30) as first, \
                httpx.stream("POST", f"{g.url}/v1/chat/completions", json=body, timeout=30) as second:
            assert first.status_code == second.status_code == 200
            # Both are generating, each holding its worker's only slot. The line iterators are kept: one
            # dropped mid-stream closes the connection, and the gateway frees the slot of a client that left.
            lines = [first.iter_lines(), second.iter_lines()]
            assert all(next(it).startswith("data: ") for it in lines)
            started = time.monotonic()
            third = httpx.post(f"{g.url}/v1/chat/completions", json=body | {"stream": False}, timeout=30)
            assert time.monotonic() - started < 2
            assert third.status_code == 429
            assert third.json()["error"]["type"] == "server_error" and third.headers["retry-after"] == "1"
        # Slots free up as the streams close.
        deadline = time.monotonic() + 5
        while (resp := httpx.post(f"{g.url}/v1/chat/completions", json=body | {"stream": False, "max_tokens": 2},
                                  timeout=30)).status_code == 429:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert resp.status_code == 200
    finally:
        g.stop()
