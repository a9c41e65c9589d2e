"""The engine's state at scrape time: vLLM's names where the meaning is the same, `conserve:` for the rest."""
from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from engine import SamplingParams
from workers.engine_stats_metrics import EngineStatsCollector

PER_CLASS_GAUGES = ["vllm:num_requests_running", "vllm:num_requests_waiting"]
GAUGES = ["vllm:kv_cache_usage_perc", "conserve:checkpoint_usage_perc"]
COUNTERS = ["vllm:num_preemptions", "conserve:layer_yields", "conserve:checkpointed_tokens",
            "conserve:restored_tokens", "conserve:recomputed_tokens", "conserve:discarded_tokens",
            "conserve:busy_seconds", "conserve:graphed_decode_steps"]
PER_CLASS_COUNTERS = ["conserve:generation_tokens_by_class"]


@pytest.fixture
def registry(idle_engine) -> CollectorRegistry:
    r = CollectorRegistry()
    r.register(EngineStatsCollector(idle_engine, "tiny-chat"))
    return r


def scrape(registry: CollectorRegistry) -> dict[str, object]:
    """The exposition text as a Prometheus server would parse it: family name -> family."""
    return {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}


def test_every_family_is_exposed_under_its_name_and_type(registry):
    families = scrape(registry)
    expected = {**{n: "gauge" for n in PER_CLASS_GAUGES + GAUGES},
                **{n: "counter" for n in COUNTERS + PER_CLASS_COUNTERS}}
    assert {name: f.type for name, f in families.items()} == expected


def test_per_class_families_have_one_series_per_request_class_even_when_idle(registry):
    families = scrape(registry)
    for name in PER_CLASS_GAUGES + PER_CLASS_COUNTERS:
        labels = [s.labels for s in families[name].samples if not s.name.endswith("_created")]
        assert labels == [{"model_name": "tiny-chat", "request_class": "online"},
                          {"model_name": "tiny-chat", "request_class": "offline"}], name


def test_engine_wide_families_are_labelled_with_the_model_name_only(registry):
    families = scrape(registry)
    for name in GAUGES + COUNTERS:
        samples = [s for s in families[name].samples if not s.name.endswith("_created")]
        assert [s.labels for s in samples] == [{"model_name": "tiny-chat"}], name


def test_counters_are_exposed_with_the_total_suffix(registry):
    text = generate_latest(registry).decode()
    assert 'vllm:num_preemptions_total{model_name="tiny-chat"}' in text
    assert 'conserve:generation_tokens_by_class_total{model_name="tiny-chat",request_class="online"}' in text


def test_values_are_read_from_the_engine_at_scrape_time(registry, idle_engine):
    def tokens(cls: str) -> float:
        return registry.get_sample_value("conserve:generation_tokens_by_class_total",
                                         {"model_name": "tiny-chat", "request_class": cls})

    online, offline = tokens("online"), tokens("offline")
    busy = registry.get_sample_value("conserve:busy_seconds_total", {"model_name": "tiny-chat"})
    idle_engine.submit([5, 6, 7], SamplingParams(max_tokens=7, ignore_eos=True), "online").final()
    idle_engine.submit([5, 6, 7], SamplingParams(max_tokens=4, ignore_eos=True), "offline").final()
    assert tokens("online") == online + 7
    assert tokens("offline") == offline + 4
    assert registry.get_sample_value("conserve:busy_seconds_total", {"model_name": "tiny-chat"}) > busy
    stats = idle_engine.stats()
    assert registry.get_sample_value("vllm:kv_cache_usage_perc", {"model_name": "tiny-chat"}) == stats.kv_usage
    assert registry.get_sample_value("vllm:num_preemptions_total",
                                     {"model_name": "tiny-chat"}) == stats.num_preemptions


def test_running_requests_are_counted_under_their_class(registry, idle_engine):
    stream = idle_engine.submit([5, 6, 7], SamplingParams(max_tokens=400, ignore_eos=True), "offline")
    try:
        next(stream)  # admitted and producing
        running = {c: registry.get_sample_value("vllm:num_requests_running",
                                                {"model_name": "tiny-chat", "request_class": c})
                   for c in ("online", "offline")}
        assert running == {"online": 0, "offline": 1}
        assert registry.get_sample_value("vllm:kv_cache_usage_perc", {"model_name": "tiny-chat"}) > 0
    finally:
        stream.cancel()
        stream.final()
