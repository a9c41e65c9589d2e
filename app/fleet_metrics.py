"""The gateway's view of its workers for Prometheus, read from their latest heartbeats at scrape time: the
same gauge names a vLLM server exposes, labelled by worker, plus co-serving figures under `conserve:`."""
from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session, sessionmaker

from app.worker_registry import alive_workers, latest_samples

log = logging.getLogger(__name__)

# (metric name, help, sample column) per worker; counters are the workers' totals since they started.
GAUGES = (
    ("vllm:kv_cache_usage_perc", "Fraction of KV cache blocks in use (1 = full).", "kv_usage"),
    ("conserve:checkpoint_usage_perc", "Fraction of the host KV checkpoint store in use.", "checkpoint_usage"),
    ("conserve:busy_fraction", "Share of the last heartbeat interval the engine spent computing.", "busy_fraction"),
    ("conserve:gpu_utilization", "NVML GPU utilisation (CUDA workers only).", "gpu_utilization"),
    ("conserve:recent_ttft_p99_seconds", "Online time to first token, p99 over the last minute.", "ttft_p99"),
    ("conserve:recent_tpot_p99_seconds", "Online time per output token, p99 over the last minute.", "tpot_p99"),
)
COUNTERS = (
    ("vllm:num_preemptions", "Requests evicted from the KV cache.", "preemptions"),
    ("conserve:layer_yields", "Offline steps stopped at a layer safepoint for online work.", "layer_yields"),
    ("conserve:checkpointed_tokens", "Offline tokens whose KV reached the host store.", "checkpointed_tokens"),
    ("conserve:restored_tokens", "Tokens restored from the checkpoint store after eviction.", "restored_tokens"),
    ("conserve:recomputed_tokens", "Tokens computed again after an eviction.", "recomputed_tokens"),
)


class FleetCollector(Collector):
    def __init__(self, sessions: sessionmaker[Session], stale_after_s: float):
        self.sessions = sessions
        self.stale_after_s = stale_after_s

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        try:
            with self.sessions() as s:
                workers = alive_workers(s, stale_after_s=self.stale_after_s)
                samples = latest_samples(s, [w.id for w in workers])
        except Exception:
            # A scrape must not fail because the store blinked; the request histograms still go out.
            log.exception("could not read worker heartbeats for /metrics")
            return
        labels = ["model_name", "worker"]
        alive = GaugeMetricFamily("conserve:workers_alive", "Workers with a fresh heartbeat.", labels=["model_name"])
        for model in sorted({w.model for w in workers}):
            alive.add_metric([model], sum(w.model == model for w in workers))
        yield alive

        running = GaugeMetricFamily("vllm:num_requests_running", "Requests in the running batch.",
                                    labels=labels + ["request_class"])
        waiting = GaugeMetricFamily("vllm:num_requests_waiting", "Requests waiting to be scheduled.",
                                    labels=labels + ["request_class"])
        tokens = GaugeMetricFamily("conserve:tokens_per_second", "Generated tokens per second by request class "
                                   "(offline: harvested).", labels=labels + ["request_class"])
        gauges = [GaugeMetricFamily(name, doc, labels=labels) for name, doc, _ in GAUGES]
        counters = [CounterMetricFamily(name, doc, labels=labels) for name, doc, _ in COUNTERS]
        for w in workers:
            sample = samples.get(w.id)
            if sample is None:
                continue
            who = [w.model, w.id]
            for klass in ("online", "offline"):
                running.add_metric(who + [klass], getattr(sample, f"running_{klass}"))
                waiting.add_metric(who + [klass], getattr(sample, f"waiting_{klass}"))
                tokens.add_metric(who + [klass], getattr(sample, f"{klass}_tokens_per_s"))
            for family, (_, _, column) in zip(gauges, GAUGES):
                value = getattr(sample, column)
                if value is not None:
                    family.add_metric(who, value)
            for family, (_, _, column) in zip(counters, COUNTERS):
                family.add_metric(who, getattr(sample, column))
        yield from (running, waiting, tokens, *gauges, *counters)
