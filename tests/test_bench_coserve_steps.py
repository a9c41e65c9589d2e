"""bench/coserve.py --step-trace: the engine's step records cut to the window and summarised."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from engine.step_trace import StepRecord

BENCH = str(Path(__file__).resolve().parents[1] / "bench")
sys.path.insert(0, BENCH)
try:
    from coserve_rounds import merge_rounds
    from coserve_steps import describe, summarise_steps, window_steps
finally:
    sys.path.remove(BENCH)


def record(at, seconds, seqs=3, decodes=3, predicted=None, scale=1.0, committed=True):
    return StepRecord(at, seconds, seqs, decodes, 1, seqs - 1, predicted, scale, committed)


def test_only_the_windows_steps_are_kept_timed_from_its_start():
    records = [record(0.5, 0.01), record(2.0, 0.01), record(3.5, 0.02), record(9.0, 0.01)]
    # The engine started at monotonic 100; the window ran from 101.5 to 104.
    steps = window_steps(records, 100.0, 101.5, 104.0)
    assert [s["at_s"] for s in steps] == [0.5, 2.0]
    assert steps[1]["seconds"] == 0.02 and set(steps[0]) >= {"seqs", "decodes", "predicted_s", "time_scale"}


def test_sized_steps_are_compared_with_their_corrected_prediction_and_the_slo():
    steps = [window_steps([r], 0.0, 0.0, 10.0)[0] for r in [
        record(1.0, 0.012, predicted=0.005, scale=2.0),              # decode-only: 1.2x its corrected prediction
        record(2.0, 0.006, predicted=0.006, scale=1.0),              # decode-only: as predicted
        record(3.0, 0.030, seqs=4, decodes=3, predicted=0.010, scale=1.0),  # with a prefill chunk: 3x
        record(4.0, 0.050),                                           # not sized (no online decode)
        record(5.0, 0.002, predicted=0.004, committed=False),         # stopped at a safepoint
    ]]
    summary = summarise_steps(steps, slo_tpot_s=0.010)
    assert summary["steps"] == 5
    sized = summary["sized"]
    assert sized["count"] == 3 and sized["over_slo_fraction"] == pytest.approx(2 / 3, abs=1e-3)
    assert sized["measured_over_corrected_p50"] == 1.2 and sized["measured_over_predicted_p50"] == 2.4
    assert summary["sized_decode_only"]["count"] == 2 and summary["sized_other"]["count"] == 1
    assert summary["sized_other"]["measured_over_corrected_p50"] == 3.0
    assert "3 sized to the TPOT SLO" in describe(summary)
    assert describe(summarise_steps(steps[3:4], 0.01)) == "1 steps, none sized to the TPOT SLO"


def test_rounds_pool_their_step_traces_one_after_another():
    def run(steps):
        return {"window_s": 10.0, "online_tokens": 5, "offline_tokens": 50, "steps": 2, "evictions": 0,
                "busy_fraction": 0.5, "offline_backlog_left": 1, "offline_submit_s": 0.1, "release_lag_max_s": 0.0,
                "requests": [], "timeline": [], "step_trace": steps}
    first = window_steps([record(1.0, 0.01)], 0.0, 0.0, 10.0)
    second = window_steps([record(2.0, 0.01)], 0.0, 0.0, 10.0)
    pooled = merge_rounds([run(first), run(second)], (), round_span_s=12.0)
    assert [(s["at_s"], s["round"]) for s in pooled["step_trace"]] == [(1.0, 1), (14.0, 2)]
