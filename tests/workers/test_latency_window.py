"""Recent latency percentiles for heartbeats: nearest-rank percentiles over a sliding time window."""
from __future__ import annotations

import pytest

from workers.latency_window import LatencyWindow, percentile


def test_percentile_of_no_values_is_none():
    assert percentile([], 50) is None


@pytest.mark.parametrize("q, expected", [(0, 1.0), (10, 1.0), (50, 5.0), (51, 6.0), (90, 9.0), (99, 10.0),
                                         (100, 10.0)])
def test_percentile_is_the_nearest_rank_of_the_sorted_values(q, expected):
    values = [7.0, 3.0, 10.0, 1.0, 5.0, 9.0, 2.0, 8.0, 4.0, 6.0]
    assert percentile(values, q) == expected


def test_percentile_of_one_value_is_that_value_at_every_rank():
    assert {percentile([0.25], q) for q in (0, 50, 99, 100)} == {0.25}


def test_percentile_leaves_its_input_unsorted():
    values = [3.0, 1.0, 2.0]
    percentile(values, 50)
    assert values == [3.0, 1.0, 2.0]


def test_an_empty_window_reports_none_for_every_percentile():
    assert LatencyWindow().percentiles() == {"ttft_p50": None, "ttft_p99": None, "tpot_p50": None,
                                             "tpot_p99": None}


def test_window_reports_p50_and_p99_of_each_series():
    w = LatencyWindow(horizon_s=60)
    for i in range(1, 101):
        w.add(ttft=i / 100, tpot=i / 1000, now=1000.0)
    assert w.percentiles(now=1000.0) == {"ttft_p50": 0.5, "ttft_p99": 0.99, "tpot_p50": 0.05, "tpot_p99": 0.099}


def test_a_missing_measurement_is_left_out_of_its_series_only():
    w = LatencyWindow()
    w.add(ttft=0.2, tpot=None, now=10.0)  # a one-token request has no time per output token
    w.add(ttft=None, tpot=0.03, now=10.0)
    assert w.percentiles(now=10.0) == {"ttft_p50": 0.2, "ttft_p99": 0.2, "tpot_p50": 0.03, "tpot_p99": 0.03}


def test_measurements_older_than_the_horizon_drop_out():
    w = LatencyWindow(horizon_s=60)
    w.add(ttft=5.0, tpot=0.5, now=100.0)   # a slow burst, long ago
    w.add(ttft=0.1, tpot=0.01, now=150.0)
    assert w.percentiles(now=150.0)["ttft_p99"] == 5.0
    assert w.percentiles(now=160.5) == {"ttft_p50": 0.1, "ttft_p99": 0.1, "tpot_p50": 0.01, "tpot_p99": 0.01}
    assert w.percentiles(now=211.0) == LatencyWindow().percentiles()


def test_a_measurement_exactly_at_the_horizon_still_counts():
    w = LatencyWindow(horizon_s=60)
    w.add(ttft=0.3, tpot=None, now=100.0)
    assert w.percentiles(now=160.0)["ttft_p50"] == 0.3


def test_window_defaults_to_the_monotonic_clock():
    w = LatencyWindow(horizon_s=60)
    w.add(ttft=0.4, tpot=0.02)
    assert w.percentiles()["ttft_p50"] == 0.4
