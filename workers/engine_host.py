"""One engine inside a worker process, with what the outside needs around it: requests in the internal wire
format, per-request metrics, recent latency percentiles and the heartbeat's sample of the engine's state."""
from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from prometheus_client import CollectorRegistry

from app.request_metrics import RequestMetrics
from engine import Engine
from engine.output import RequestOutput, RequestStream
from engine.sampling_params import SamplingParams
from workers.engine_stats_metrics import EngineStatsCollector
from workers.latency_window import LatencyWindow
from workers.nvml import GpuUtilization


class EngineHost:
    def __init__(self, engine: Engine, served_model_name: str | None = None):
        self.engine = engine
        self.model_name = served_model_name or engine.model_name
        self.registry = CollectorRegistry()
        self.metrics = RequestMetrics(self.registry)
        self.registry.register(EngineStatsCollector(engine, self.model_name))
        self.window = LatencyWindow()
        self.gpu = GpuUtilization(engine.device)
        self._ids = itertools.count()
        self._prefix = uuid.uuid4().hex[:8]
        self._last_sample: tuple[float, Any] | None = None

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def offline_waiting(self) -> int:
        return self.engine.stats().num_waiting["offline"]

    def submit(self, prompt: Any, params: dict[str, Any], request_class: str,
               request_id: str | None = None, deadline: float | None = None) -> RequestStream:
        """Queue a request; InvalidRequestError (bad prompt or parameters) is raised here, before any output."""
        params = dict(params)
        if params.get("max_tokens") is None:
            # "As many as fit": the engine stops a request at the end of the context by itself.
            params["max_tokens"] = self.engine.max_model_len
        sampling = SamplingParams.from_dict(params)
        request_id = request_id or f"{self._prefix}-{next(self._ids)}"
        return self.engine.submit(prompt, sampling, request_class, request_id=request_id, deadline=deadline)

    async def events(self, stream: RequestStream, request_class: str) -> AsyncIterator[dict[str, Any]]:
        """The request's outputs as wire events; aborts the request in the engine if the consumer stops early
        (the client went away)."""
        timer = self.metrics.timer(self.model_name, request_class)
        prompt_tokens = 0
        try:
            async for out in stream:
                timer.tokens_arrived(len(out.new_token_ids))
                prompt_tokens = out.num_prompt_tokens
                if out.finished:
                    self._finished(out, timer, request_class)
                yield wire_event(out)
        except Exception as exc:  # the engine failed this request: tell the consumer, don't drop the stream
            timer.finished("error", prompt_tokens)
            yield {"error": str(exc) or type(exc).__name__, "finished": True}
        finally:
            if not timer.done:
                # The consumer left first: stop the request and count it as aborted (the engine's own
                # final output goes unread).
                stream.cancel()
                timer.finished("abort", prompt_tokens)

    def _finished(self, out: RequestOutput, timer: Any, request_class: str) -> None:
        queued = out.metrics.queued if out.metrics else None
        timer.finished(out.finish_reason or "abort", out.num_prompt_tokens, queued)
        if request_class == "online" and out.finish_reason != "abort":
            self.window.add(timer.time_to_first_token, timer.time_per_output_token)

    def sample(self) -> dict[str, Any]:
        """The heartbeat's reading: state now, rates since the previous sample, latency of the last minute."""
        stats = self.engine.stats()
        now = time.monotonic()
        prev = self._last_sample
        self._last_sample = (now, stats)
        if prev is None:
            dt, busy, online_tps, offline_tps = 0.0, 0.0, 0.0, 0.0
        else:
            dt = max(now - prev[0], 1e-9)
            p = prev[1]
            busy = min(1.0, (stats.busy_seconds - p.busy_seconds) / dt)
            online_tps = (stats.generation_tokens_by_class["online"] - p.generation_tokens_by_class["online"]) / dt
            offline_tps = (stats.generation_tokens_by_class["offline"] - p.generation_tokens_by_class["offline"]) / dt
        return {
            "kv_usage": stats.kv_usage, "checkpoint_usage": stats.checkpoint_usage,
            "running_online": stats.num_running["online"], "running_offline": stats.num_running["offline"],
            "waiting_online": stats.num_waiting["online"], "waiting_offline": stats.num_waiting["offline"],
            "busy_fraction": busy, "gpu_utilization": self.gpu.read(),
            "online_tokens_per_s": online_tps, "offline_tokens_per_s": offline_tps,
            "preemptions": stats.num_preemptions, "layer_yields": stats.layer_yields,
            "checkpointed_tokens": stats.checkpointed_tokens, "restored_tokens": stats.restored_tokens,
            "recomputed_tokens": stats.recomputed_tokens,
            **self.window.percentiles(),
        }


def wire_event(out: RequestOutput) -> dict[str, Any]:
    """One line of the worker's internal stream (the gateway turns it into OpenAI's format)."""
    event: dict[str, Any] = {"delta": out.delta, "token_ids": out.new_token_ids, "finished": out.finished,
                             "prompt_tokens": out.num_prompt_tokens, "completion_tokens": out.num_output_tokens}
    if out.finished:
        event["finish_reason"] = out.finish_reason
    return event
