"""The co-serving benchmark's workload and statistics: arrival traces, prompts of exact token lengths,
per-request records, and the figures bench/coserve.py reports for each policy.

Everything random comes from numpy generators seeded with (--seed, stream), one stream per use, so the
online trace does not change when, say, the calibration sample grows."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from throughput import TEXT  # the same fixed English text the throughput benchmark cuts prompts from

# Seed streams: np.random.default_rng([seed, STREAM]).
ARRIVAL_STREAM, ONLINE_LEN_STREAM, OFFLINE_LEN_STREAM, CALIBRATION_STREAM, WINDOW_STREAM = range(5)


@dataclass(frozen=True)
class Lengths:
    """Inclusive ranges that prompt and output lengths are drawn from, uniformly."""
    prompt: tuple[int, int]
    output: tuple[int, int]


@dataclass
class RequestSpec:
    prompt_ids: list[int]
    max_tokens: int
    arrival_s: float = 0.0  # offset from the start of the measured window (online requests)


@dataclass
class Workload:
    online: list[RequestSpec]
    offline: list[RequestSpec]


@dataclass
class OnlineRecord:
    """What the client saw of one online request (time.monotonic() stamps) and the engine's final output."""
    spec: RequestSpec
    request_id: str
    submitted_at: float = 0.0
    first_token_at: float | None = None
    done_at: float | None = None
    final: object | None = None  # the engine's final RequestOutput
    error: str | None = None

    @property
    def completed(self) -> bool:
        return self.final is not None and self.final.finish_reason == "length" and self.error is None


# ---- workload ---------------------------------------------------------------------------------

def text_token_ids(tokenizer, needed: int) -> list[int]:
    """At least `needed` token ids of TEXT repeated (prompts are windows of it)."""
    once = tokenizer.encode(TEXT)
    return (once * (needed // len(once) + 1))[:max(needed, len(once))]


def arrival_times(seed: int, rate: float, duration: float, arrivals: str, burstiness: float) -> list[float]:
    """Arrival offsets in [0, duration): Poisson (exponential gaps) or gamma gaps with coefficient of
    variation `burstiness` (shape 1/CV^2; CV 1 is Poisson, above 1 bursty). Gaps are drawn at unit
    rate and scaled by 1/rate, so one seed gives the same trace shape at every rate."""
    rng = np.random.default_rng([seed, ARRIVAL_STREAM])
    times, t = [], 0.0
    while True:
        if arrivals == "poisson":
            gap = rng.exponential(1.0)
        else:
            shape = 1.0 / burstiness ** 2
            gap = rng.gamma(shape, 1.0 / shape)
        t += gap / rate
        if t >= duration:
            return times
        times.append(t)


def sample_requests(base_ids: list[int], lengths: Lengths, count: int, seed: int, stream: int) -> list[RequestSpec]:
    """`count` requests with prompt and output lengths drawn from `lengths`; each prompt is a window
    of base_ids at a random offset."""
    rng = np.random.default_rng([seed, stream])
    windows = np.random.default_rng([seed, WINDOW_STREAM, stream])
    specs = []
    for _ in range(count):
        prompt_len = int(rng.integers(lengths.prompt[0], lengths.prompt[1] + 1))
        output_len = int(rng.integers(lengths.output[0], lengths.output[1] + 1))
        start = int(windows.integers(0, len(base_ids) - prompt_len + 1))
        specs.append(RequestSpec(base_ids[start:start + prompt_len], output_len))
    return specs


def build_workload(base_ids: list[int], *, seed: int, rate: float, duration: float, arrivals: str,
                   burstiness: float, online: Lengths, offline: Lengths, num_offline: int) -> Workload:
    times = arrival_times(seed, rate, duration, arrivals, burstiness)
    online_specs = sample_requests(base_ids, online, len(times), seed, ONLINE_LEN_STREAM)
    for spec, t in zip(online_specs, times):
        spec.arrival_s = t
    return Workload(online_specs, sample_requests(base_ids, offline, num_offline, seed, OFFLINE_LEN_STREAM))


def sleep_until(deadline: float) -> None:
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, 0.5))


# ---- statistics -------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def tpot(record: OnlineRecord) -> float | None:
    """vLLM's time per output token: (e2e - ttft) / (output tokens - 1)."""
    m, n = record.final.metrics, record.final.num_output_tokens
    return (m.e2e - m.time_to_first_token) / (n - 1) if n > 1 else None


def ttft(record: OnlineRecord, ended_at: float) -> tuple[float, bool]:
    """(TTFT in seconds, censored): a request that got no first token before the run ended counts with
    the lower bound ended_at - submitted_at."""
    if record.final is not None and record.final.metrics is not None \
            and record.final.metrics.time_to_first_token is not None:
        return record.final.metrics.time_to_first_token, False
    if record.first_token_at is not None:
        return record.first_token_at - record.submitted_at, False
    return ended_at - record.submitted_at, True


def summarise_online(records: list[OnlineRecord], slo_ttft_s: float, slo_tpot_s: float, ended_at: float,
                     window_start: float) -> dict:
    """Latency figures of the online requests that arrived in the window (online_figures), with one
    row per request under "requests"."""
    rows = [_request_row(r, ended_at, window_start, slo_ttft_s, slo_tpot_s) for r in records]
    return {**online_figures(rows), "requests": rows}


def online_figures(rows: list[dict]) -> dict:
    """Latency figures from request rows (one window's, or several rounds' pooled).

    TTFT and preemption-latency percentiles cover every request (a request with no first token by the
    end counts with its wait so far: a lower bound, counted in online_ttft_censored). TPOT covers
    completed requests. SLO attainment = requests completed meeting both SLOs / requests arrived, so a
    request still unfinished at the end counts as a miss."""
    completed = [r for r in rows if r["completed"]]
    ttfts = [r["ttft_s"] for r in rows]
    tpots = [r["tpot_s"] for r in completed if r["tpot_s"] is not None]
    # queued = arrival -> first scheduled; for a request never scheduled, arrival -> abort.
    queued = [r["queued_s"] for r in rows if r.get("queued_s") is not None]
    return {
        "online_arrived": len(rows),
        "online_completed": len(completed),
        "online_unfinished": len(rows) - len(completed),
        "online_ttft_censored": sum(1 for r in rows if r["ttft_censored"]),
        "online_errors": sum(1 for r in rows if r.get("error")),
        "online_ttft_p50_s": percentile(ttfts, 50),
        "online_ttft_p99_s": percentile(ttfts, 99),
        "online_tpot_p50_s": percentile(tpots, 50),
        "online_tpot_p99_s": percentile(tpots, 99),
        "online_slo_attainment": sum(1 for r in rows if r["slo_met"]) / len(rows) if rows else None,
        "preemption_latency_p50_s": percentile(queued, 50),
        "preemption_latency_p99_s": percentile(queued, 99),
    }


def _request_row(r: OnlineRecord, ended_at: float, window_start: float, slo_ttft_s: float,
                 slo_tpot_s: float) -> dict:
    t, censored = ttft(r, ended_at)
    per_token = tpot(r) if r.completed else None
    row = {"arrival_s": round(r.submitted_at - window_start, 4), "prompt_tokens": len(r.spec.prompt_ids),
           "output_tokens": r.spec.max_tokens, "completed": r.completed, "ttft_s": round(t, 6),
           "ttft_censored": censored, "error": r.error is not None,
           "slo_met": r.completed and r.final.metrics.time_to_first_token <= slo_ttft_s
           and (per_token or 0.0) <= slo_tpot_s}
    if r.final is not None and r.final.metrics is not None:
        row["queued_s"] = round(r.final.metrics.queued, 6)
    if r.completed:
        row["done_s"] = round(r.done_at - window_start, 4)
        row["tpot_s"] = None if per_token is None else round(per_token, 6)
    return row
