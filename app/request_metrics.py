"""Per-request latency histograms and token counters under vLLM's metric names, so vLLM's Grafana dashboards
read ConServe unchanged. The gateway observes online requests as its clients see them; each worker observes
every request its engine runs (online and offline). Labels: model_name (as vLLM) and request_class."""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram

# vLLM's buckets, so dashboards' heatmaps and quantile queries line up with theirs.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)
LABELS = ("model_name", "request_class")


class RequestMetrics:
    def __init__(self, registry: CollectorRegistry):
        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, LABELS, buckets=buckets, registry=registry)

        self.ttft = hist("vllm:time_to_first_token_seconds", "Time to first token in seconds.", TTFT_BUCKETS)
        self.itl = hist("vllm:inter_token_latency_seconds", "Time between consecutive tokens in seconds.",
                        ITL_BUCKETS)
        self.tpot = hist("vllm:request_time_per_output_token_seconds",
                         "Mean time per output token of each request, in seconds.", ITL_BUCKETS)
        self.e2e = hist("vllm:e2e_request_latency_seconds", "End-to-end request latency in seconds.", E2E_BUCKETS)
        self.queue = hist("vllm:request_queue_time_seconds", "Time a request waited before it first ran.",
                          E2E_BUCKETS)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens of finished requests.", LABELS,
                                     registry=registry)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens.", LABELS, registry=registry)
        self.success = Counter("vllm:request_success", "Finished requests by finish reason.",
                               LABELS + ("finished_reason",), registry=registry)

    def timer(self, model_name: str, request_class: str) -> "RequestTimer":
        return RequestTimer(self, model_name, request_class)


class RequestTimer:
    """Timestamps one request's tokens as they pass and records its metrics once, at the end."""

    def __init__(self, metrics: RequestMetrics, model_name: str, request_class: str):
        self._m = metrics
        self._labels = (model_name, request_class)
        self.start = time.monotonic()
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.tokens = 0
        self._done = False

    def tokens_arrived(self, count: int) -> None:
        """count tokens arrived together now (each output usually carries one)."""
        if count <= 0:
            return
        now = time.monotonic()
        if self.first_token is None:
            self.first_token = now
            self._m.ttft.labels(*self._labels).observe(now - self.start)
        else:
            # Several tokens in one output share the gap since the last one.
            gap = (now - self.last_token) / count
            for _ in range(count):
                self._m.itl.labels(*self._labels).observe(gap)
        self.last_token = now
        self.tokens += count
        self._m.generation_tokens.labels(*self._labels).inc(count)

    def finished(self, reason: str, prompt_tokens: int, queued: float | None = None) -> None:
        if self._done:
            return
        self._done = True
        now = time.monotonic()
        self._m.e2e.labels(*self._labels).observe(now - self.start)
        if queued is not None:
            self._m.queue.labels(*self._labels).observe(queued)
        if self.tokens > 1 and self.first_token is not None and self.last_token is not None:
            self._m.tpot.labels(*self._labels).observe((self.last_token - self.first_token) / (self.tokens - 1))
        self._m.prompt_tokens.labels(*self._labels).inc(prompt_tokens)
        self._m.success.labels(*self._labels, reason).inc()

    @property
    def done(self) -> bool:
        return self._done

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.start

    @property
    def time_per_output_token(self) -> float | None:
        if self.tokens < 2 or self.first_token is None or self.last_token is None:
            return None
        return (self.last_token - self.first_token) / (self.tokens - 1)
