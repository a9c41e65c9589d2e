"""The engine's own counters and gauges, read at scrape time, under vLLM's names where the meaning is the same
and `conserve:` for what only co-serving has."""
from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from engine import Engine

CLASSES = ("online", "offline")


class EngineStatsCollector(Collector):
    def __init__(self, engine: Engine, model_name: str):
        self.engine = engine
        self.model_name = model_name

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s = self.engine.stats()
        m = self.model_name

        def per_class(name: str, doc: str, values: dict[str, int]) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=["model_name", "request_class"])
            for c in CLASSES:
                g.add_metric([m, c], values[c])
            return g

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return _labelled(GaugeMetricFamily(name, doc, labels=["model_name"]), m, value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return _labelled(CounterMetricFamily(name, doc, labels=["model_name"]), m, value)

        yield per_class("vllm:num_requests_running", "Requests in the running batch.", s.num_running)
        yield per_class("vllm:num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting)
        yield gauge("vllm:kv_cache_usage_perc", "Fraction of KV cache blocks in use (1 = full).", s.kv_usage)
        yield counter("vllm:num_preemptions", "Requests evicted from the KV cache.", s.num_preemptions)
        yield gauge("conserve:checkpoint_usage_perc", "Fraction of the host KV checkpoint store in use.",
                    s.checkpoint_usage)
        yield counter("conserve:layer_yields", "Offline steps stopped at a layer safepoint for online work.",
                      s.layer_yields)
        yield counter("conserve:checkpointed_tokens", "Offline tokens whose KV reached the host store.",
                      s.checkpointed_tokens)
        yield counter("conserve:restored_tokens", "Tokens restored from the checkpoint store after eviction.",
                      s.restored_tokens)
        yield counter("conserve:recomputed_tokens", "Tokens computed again after an eviction.",
                      s.recomputed_tokens)
        yield counter("conserve:discarded_tokens", "Tokens of partial steps thrown away by a layer yield.",
                      s.discarded_tokens)
        yield counter("conserve:busy_seconds", "Seconds the engine spent computing steps.", s.busy_seconds)
        yield counter("conserve:graphed_decode_steps", "Decode steps replayed from CUDA graphs.", s.graphed_steps)
        per_class_tokens = CounterMetricFamily("conserve:generation_tokens_by_class",
                                               "Tokens sampled, by request class (offline ones are harvested).",
                                               labels=["model_name", "request_class"])
        for c in CLASSES:
            per_class_tokens.add_metric([m, c], s.generation_tokens_by_class[c])
        yield per_class_tokens


def _labelled(family, model_name: str, value: float):
    family.add_metric([model_name], value)
    return family
