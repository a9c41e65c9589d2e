"""bench/coserve.py --rounds: one policy's rounds pooled as if they were one window."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = str(Path(__file__).resolve().parents[1] / "bench")
sys.path.insert(0, BENCH)
try:
    from coserve_rounds import merge_rounds
    from coserve_workload import online_figures, percentile
finally:
    sys.path.remove(BENCH)

COUNTERS = ("recomputed_tokens", "layer_yields")


def row(arrival, ttft, tpot=None, done=None, slo_met=False, queued=0.01, censored=False):
    r = {"arrival_s": arrival, "prompt_tokens": 10, "output_tokens": 5, "completed": done is not None,
         "ttft_s": ttft, "ttft_censored": censored, "error": False, "slo_met": slo_met, "queued_s": queued}
    if done is not None:
        r.update(done_s=done, tpot_s=tpot)
    return r


def window(seconds, online, offline, busy, rows, evictions=0, recomputed=0, others=0.0):
    return {"window_s": seconds, "online_tokens": online, "offline_tokens": offline, "steps": 10,
            "evictions": evictions, "recomputed_tokens": recomputed, "layer_yields": 1,
            "busy_fraction": busy, "offline_backlog_left": 3, "offline_submit_s": 0.1, "release_lag_max_s": 0.002,
            "other_processes_cores_busy": others, **online_figures(rows), "requests": rows,
            "timeline": [{"t": 0.0, "offline_tokens": 0}, {"t": seconds, "offline_tokens": offline}],
            "online_tok_s": online / seconds, "offline_tok_s": offline / seconds,
            "total_tok_s": (online + offline) / seconds}


def test_rounds_pool_requests_for_percentiles_and_windows_for_rates():
    first = window(10.0, 100, 1000, 0.5, [row(1.0, 0.1, 0.02, 3.0, True), row(2.0, 0.3, None, 4.0, True)],
                   evictions=2, recomputed=50, others=0.2)
    second = window(20.0, 300, 5000, 1.0, [row(1.5, 0.9, 0.05, 9.0), row(8.0, 12.0, censored=True, queued=None)],
                    evictions=1, recomputed=10, others=0.0)
    merged = merge_rounds([first, second], COUNTERS, round_span_s=15.0)

    assert merged["window_s"] == 30.0 and merged["evictions"] == 3 and merged["recomputed_tokens"] == 60
    assert merged["offline_tok_s"] == pytest.approx(6000 / 30) and merged["total_tok_s"] == pytest.approx(6400 / 30)
    assert merged["busy_fraction"] == pytest.approx((0.5 * 10 + 1.0 * 20) / 30)
    assert merged["other_processes_cores_busy"] == pytest.approx(round(2.0 / 30, 2))
    # Latencies over the four requests together, not an average of the two rounds' p99s.
    assert merged["online_arrived"] == 4 and merged["online_completed"] == 3
    assert merged["online_ttft_p99_s"] == pytest.approx(percentile([0.1, 0.3, 0.9, 12.0], 99))
    assert merged["online_tpot_p99_s"] == pytest.approx(percentile([0.02, 0.05], 99))  # None: one token only
    assert merged["online_ttft_censored"] == 1 and merged["online_slo_attainment"] == 0.5
    assert merged["preemption_latency_p99_s"] == pytest.approx(0.01)
    # The second round's requests and timeline follow the first's on one time axis.
    assert [r["arrival_s"] for r in merged["requests"]] == [1.0, 2.0, 16.5, 23.0]
    assert merged["requests"][2]["done_s"] == 24.0 and merged["timeline"][-1]["t"] == 35.0
    assert [s["round"] for s in merged["timeline"]] == [1, 1, 2, 2]
    assert [r["offline_tok_s"] for r in merged["rounds"]] == [100.0, 250.0]


def test_a_failed_round_is_left_out_and_named():
    good = window(10.0, 100, 1000, 0.5, [row(1.0, 0.1, 0.02, 3.0, True)])
    merged = merge_rounds([{"error": "Traceback\nRuntimeError: boom"}, good], COUNTERS, round_span_s=15.0)
    assert merged["offline_tok_s"] == 100.0 and merged["online_arrived"] == 1
    assert merged["failed_rounds"] == [{"round": 1, "error": "Traceback\nRuntimeError: boom"}]
    assert merged["requests"][0]["arrival_s"] == 16.0  # still the second round's place in time
    assert merge_rounds([{"error": "a"}, {"error": "b"}], COUNTERS, 15.0) == {"error": "a"}
