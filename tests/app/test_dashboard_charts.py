"""The live page's charts from heartbeat series: per-worker lines, fleet lines, SLO thresholds."""
from __future__ import annotations

import xml.etree.ElementTree as ET

from app.dashboard_charts import live_charts
from app.dashboard_data import LIVE_FIELDS, LiveSeries


def series(values):
    return [(1000.0 + 2 * i, v) for i, v in enumerate(values)]


def test_one_worker_gets_its_lines_and_the_slo():
    live = LiveSeries(990.0, 1010.0, 1000.0, 50.0, {"w1": {f: series([0.2, 0.4]) for f in LIVE_FIELDS}})
    ttft, tpot, tokens, busy = live_charts(live)
    for chart in (ttft, tpot, tokens, busy):
        ET.fromstring(chart)
    assert "SLO 1000 ms" in ttft and "SLO 50 ms" in tpot
    assert "TTFT p99" in ttft and "TTFT p50" in ttft and "worst worker" not in ttft
    assert "offline (harvested)" in tokens and "online" in tokens


def test_several_workers_add_fleet_lines():
    fields = {f: series([0.1, 0.3]) for f in LIVE_FIELDS}
    live = LiveSeries(990.0, 1010.0, 1000.0, 50.0, {"w1": fields, "w2": fields})
    ttft, _, tokens, _ = live_charts(live)
    assert "TTFT p99 · worst worker" in ttft and "TTFT p99 · w1" in ttft and "TTFT p99 · w2" in ttft
    assert "offline (harvested) · all workers" in tokens


def test_no_heartbeats_yet_draws_empty_charts_without_slo():
    charts = live_charts(LiveSeries(990.0, 1010.0, None, None, {}))
    assert len(charts) == 4 and all("no data yet" in c for c in charts)
    assert "SLO" not in charts[0]
