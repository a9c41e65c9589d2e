"""EngineHost on a real engine: requests in, wire events out, per-request metrics, the heartbeat's sample."""
from __future__ import annotations

import asyncio
import time

import pytest

from app.worker_registry import SAMPLE_FIELDS
from engine import InvalidRequestError, SamplingParams
from workers.engine_host import EngineHost

PROMPT = [5, 6, 7, 8]  # token ids: "what is the capital"
GREEDY = {"temperature": 0.0, "ignore_eos": True}


async def run_to_end(host: EngineHost, params: dict, request_class: str = "online", prompt=PROMPT) -> list[dict]:
    stream = host.submit(prompt, params, request_class)
    return [event async for event in host.events(stream, request_class)]


def collect(host: EngineHost, params: dict, request_class: str = "online", prompt=PROMPT) -> list[dict]:
    return asyncio.run(run_to_end(host, params, request_class, prompt))


def metric(host: EngineHost, name: str, request_class: str = "online", **labels: str) -> float | None:
    return host.registry.get_sample_value(name, {"model_name": host.model_name, "request_class": request_class,
                                                 **labels})


# ---- submit --------------------------------------------------------------------------------------------------

def test_max_tokens_left_out_generates_up_to_the_end_of_the_context(host):
    events = collect(host, {**GREEDY, "max_tokens": None})
    last = events[-1]
    assert last["finish_reason"] == "length"
    assert last["completion_tokens"] == host.max_model_len - len(PROMPT)
    assert host.max_model_len == host.engine.max_model_len


def test_an_explicit_max_tokens_is_kept(host):
    events = collect(host, {**GREEDY, "max_tokens": 3})
    assert events[-1]["completion_tokens"] == 3
    assert events[-1]["finish_reason"] == "length"


def test_submit_leaves_the_callers_params_untouched(host):
    params = {"max_tokens": None, "temperature": 0.0}
    stream = host.submit(PROMPT, params, "online")
    stream.cancel()
    stream.final()
    assert params == {"max_tokens": None, "temperature": 0.0}


@pytest.mark.parametrize("params, request_class, prompt, message", [
    ({"max_tokens": 0}, "online", PROMPT, "max_tokens"),             # 0 is a bad value, not "as many as fit"
    ({"max_tokens": 4, "beam_width": 2}, "online", PROMPT, "unknown sampling parameter"),
    ({"temperature": -1.0}, "online", PROMPT, "temperature"),
    ({"max_tokens": 4}, "batch", PROMPT, "request_class"),
    ({"max_tokens": 4}, "online", [], "empty"),
])
def test_bad_requests_fail_at_submit_before_any_output(host, params, request_class, prompt, message):
    with pytest.raises(InvalidRequestError, match=message):
        host.submit(prompt, params, request_class)


def test_a_prompt_that_fills_the_context_is_refused(host):
    with pytest.raises(InvalidRequestError, match="context"):
        host.submit([5] * host.max_model_len, {"max_tokens": None}, "online")


def test_requests_get_distinct_ids_unless_the_caller_names_one(host):
    a = host.submit(PROMPT, {"max_tokens": 1}, "online")
    b = host.submit(PROMPT, {"max_tokens": 1}, "online")
    named = host.submit(PROMPT, {"max_tokens": 1}, "online", request_id="gateway-42")
    for s in (a, b, named):
        s.final()
    assert a.request_id != b.request_id
    assert named.request_id == "gateway-42"


# ---- events ----------------------------------------------------------------------------------------------------

def test_events_carry_each_token_and_end_with_one_finished_event(host):
    events = collect(host, {**GREEDY, "max_tokens": 5})
    assert [e["finished"] for e in events] == [False] * (len(events) - 1) + [True]
    for e in events[:-1]:
        assert set(e) == {"delta", "token_ids", "finished", "prompt_tokens", "completion_tokens"}
    assert set(events[-1]) == {"delta", "token_ids", "finished", "prompt_tokens", "completion_tokens",
                               "finish_reason"}
    assert all(e["prompt_tokens"] == len(PROMPT) for e in events)
    assert [e["completion_tokens"] for e in events] == [1, 2, 3, 4, 5]
    assert all(len(e["token_ids"]) == 1 for e in events)
    assert all(isinstance(e["delta"], str) for e in events)


def test_events_match_what_the_engine_generates(host):
    events = collect(host, {**GREEDY, "max_tokens": 6})
    direct = host.engine.submit(PROMPT, SamplingParams(max_tokens=6, **GREEDY)).final()
    assert [t for e in events for t in e["token_ids"]] == direct.token_ids
    assert "".join(e["delta"] for e in events) == direct.text


def test_a_finished_online_request_is_recorded_in_the_metrics_and_the_latency_window(host):
    events = collect(host, {**GREEDY, "max_tokens": 4})
    assert events[-1]["finish_reason"] == "length"
    assert metric(host, "vllm:time_to_first_token_seconds_count") == 1
    assert metric(host, "vllm:inter_token_latency_seconds_count") == 3
    assert metric(host, "vllm:request_time_per_output_token_seconds_count") == 1
    assert metric(host, "vllm:e2e_request_latency_seconds_count") == 1
    assert metric(host, "vllm:request_queue_time_seconds_count") == 1
    assert metric(host, "vllm:generation_tokens_total") == 4
    assert metric(host, "vllm:prompt_tokens_total") == len(PROMPT)
    assert metric(host, "vllm:request_success_total", finished_reason="length") == 1
    window = host.window.percentiles()
    assert window["ttft_p50"] is not None and window["ttft_p50"] >= 0
    assert window["tpot_p50"] is not None and window["tpot_p50"] >= 0


def test_offline_requests_are_labelled_offline_and_stay_out_of_the_online_latency_window(host):
    collect(host, {**GREEDY, "max_tokens": 3}, request_class="offline")
    assert metric(host, "vllm:generation_tokens_total", "offline") == 3
    assert metric(host, "vllm:request_success_total", "offline", finished_reason="length") == 1
    assert metric(host, "vllm:time_to_first_token_seconds_count", "online") is None
    assert host.window.percentiles() == {"ttft_p50": None, "ttft_p99": None, "tpot_p50": None, "tpot_p99": None}


def test_a_one_token_request_has_a_first_token_time_but_no_time_per_output_token(host):
    collect(host, {**GREEDY, "max_tokens": 1})
    window = host.window.percentiles()
    assert window["ttft_p50"] is not None
    assert window["tpot_p50"] is None


def test_consumer_leaving_early_aborts_the_request(host):
    async def leave_after_first_event():
        stream = host.submit(PROMPT, {**GREEDY, "max_tokens": None}, "online")
        events = host.events(stream, "online")
        first = await events.__anext__()
        await events.aclose()  # the client went away
        rest = [out async for out in stream]  # what the engine put after that, up to its final output
        return first, rest

    first, rest = asyncio.run(leave_after_first_event())
    assert first["finished"] is False
    final = rest[-1]
    assert final.finished and final.finish_reason == "abort"
    assert final.num_output_tokens < host.max_model_len - len(PROMPT)
    # Counted as an aborted request, but not an online latency sample.
    assert metric(host, "vllm:request_success_total", finished_reason="abort") == 1
    assert metric(host, "vllm:prompt_tokens_total") == len(PROMPT)
    assert metric(host, "vllm:e2e_request_latency_seconds_count") == 1
    assert host.window.percentiles()["ttft_p50"] is None


# ---- sample ----------------------------------------------------------------------------------------------------

def test_sample_reports_exactly_the_heartbeat_fields(host):
    assert set(host.sample()) == SAMPLE_FIELDS


def test_the_first_sample_only_sets_the_baseline_of_the_rates(host):
    s = host.sample()
    assert s["busy_fraction"] == 0.0
    assert s["online_tokens_per_s"] == 0.0
    assert s["offline_tokens_per_s"] == 0.0
    assert s["gpu_utilization"] is None  # no NVML reading on the CPU
    assert s["running_online"] == s["running_offline"] == s["waiting_online"] == s["waiting_offline"] == 0


def test_sample_rates_are_tokens_per_second_since_the_previous_sample(host):
    a0 = time.monotonic()
    host.sample()
    a1 = time.monotonic()
    collect(host, {**GREEDY, "max_tokens": 20})
    b0 = time.monotonic()
    s = host.sample()
    b1 = time.monotonic()
    # The host took its readings somewhere inside [a0, a1] and [b0, b1].
    assert 20 / (b1 - a0) <= s["online_tokens_per_s"] <= 20 / (b0 - a1)
    assert s["offline_tokens_per_s"] == 0.0
    assert 0.0 < s["busy_fraction"] <= 1.0
    assert s["ttft_p50"] is not None and s["ttft_p99"] is not None
    assert s["tpot_p50"] is not None and s["tpot_p99"] is not None


def test_offline_tokens_count_in_the_offline_rate(host):
    host.sample()
    collect(host, {**GREEDY, "max_tokens": 10}, request_class="offline")
    s = host.sample()
    assert s["offline_tokens_per_s"] > 0.0
    assert s["online_tokens_per_s"] == 0.0
    assert s["ttft_p50"] is None


def test_sample_shows_a_request_in_flight_under_its_class(host):
    async def sample_mid_request():
        stream = host.submit(PROMPT, {**GREEDY, "max_tokens": None}, "offline")
        events = host.events(stream, "offline")
        await events.__anext__()
        s = host.sample()
        await events.aclose()
        return s

    s = asyncio.run(sample_mid_request())
    assert s["running_offline"] == 1
    assert s["running_online"] == 0
    assert s["kv_usage"] > 0.0
