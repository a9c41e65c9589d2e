"""The dashboard's server-side SVG charts: well-formed, labelled, escaped, scaled right, deterministic."""
from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path

from app.svg_charts import Series, Threshold, _y_ticks, compact, line_chart, progress_chart

NS = "{http://www.w3.org/2000/svg}"
NOW = 1_700_000_000.0
WINDOW = (NOW - 300, NOW)


def parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg)
    assert root.tag == f"{NS}svg"
    return root


def texts(root: ET.Element, cls: str | None = None) -> list[str]:
    return ["".join(el.itertext()) for el in root.iter(f"{NS}text") if cls is None or el.get("class") == cls]


def group(root: ET.Element, cls: str) -> list[ET.Element]:
    return [g for g in root.iter(f"{NS}g") if g.get("class") == cls]


def polylines(g: ET.Element) -> list[list[tuple[float, float]]]:
    return [[tuple(map(float, p.split(","))) for p in pl.get("points").split()] for pl in g.iter(f"{NS}polyline")]


def latency_chart(**kwargs) -> str:
    series = [Series("p99 worker-a", [(NOW - 300 + 10 * i, 200.0 + 20 * i) for i in range(31)]),
              Series("p50 worker-a", [(NOW - 300 + 10 * i, 80.0 + 5 * (i % 7)) for i in range(31)], dashed=True)]
    return line_chart("Online TTFT", series, y_unit="ms", thresholds=[Threshold("SLO 1000 ms", 1000.0)],
                      x_window=WINDOW, **kwargs)


def test_svg_is_well_formed_accessible_and_scalable():
    root = parse(latency_chart())
    assert root.get("role") == "img" and root.get("class") == "chart" and root.get("width") == "100%"
    assert root.get("aria-label") == "Online TTFT"
    assert root.find(f"{NS}title").text == "Online TTFT"
    assert root.get("viewBox") == "0 0 640 260"


def test_title_unit_legend_and_threshold_labels_are_shown():
    root = parse(latency_chart())
    assert texts(root, "chart-title") == ["Online TTFT"]
    assert texts(root, "unit") == ["ms"]
    legend = [t for g in group(root, "legend") for t in texts(g)]
    assert legend == ["p99 worker-a", "p50 worker-a", "SLO 1000 ms"]
    assert texts(root, "threshold-label") == ["SLO 1000 ms"]


def test_value_at_threshold_lands_on_the_threshold_line():
    series = [Series("a", [(NOW - 200, 300.0), (NOW - 100, 750.0), (NOW, 420.0)])]
    root = parse(line_chart("x", series, y_unit="ms", thresholds=[Threshold("SLO", 750.0)], x_window=WINDOW))
    line = next(el for el in root.iter(f"{NS}line") if el.get("class") == "threshold")
    (points,) = polylines(group(root, "series")[0])
    assert points[1][1] == float(line.get("y1")) == float(line.get("y2"))
    assert points[0][1] > points[1][1]           # smaller values sit lower (larger SVG y)


def test_gaps_split_the_line():
    series = [Series("a", [(NOW - 250, 1.0), (NOW - 240, 2.0), (NOW - 230, None), (NOW - 220, 3.0),
                           (NOW - 210, 4.0), (NOW - 200, 5.0), (NOW - 190, None), (NOW - 180, 2.0)])]
    g = group(parse(line_chart("x", series, y_unit="ms", x_window=WINDOW)), "series")[0]
    assert [len(seg) for seg in polylines(g)] == [2, 3]
    assert len(list(g.iter(f"{NS}circle"))) == 1   # the lone point after the last gap is a dot


def test_y_ticks_are_nice_numbers():
    for lo, hi in [(0, 1), (0, 7.3), (0, 1100), (0, 13_000), (0, 0.042), (0, 999), (10, 95), (0, 3.3e6)]:
        ticks = _y_ticks(lo, hi)
        step = ticks[1] - ticks[0]
        mantissa = step / 10 ** math.floor(math.log10(step))
        assert any(math.isclose(mantissa, m) for m in (1, 2, 2.5, 5)), (lo, hi, ticks)
        assert 4 <= len(ticks) <= 6 and ticks[0] <= lo and ticks[-1] >= hi, (lo, hi, ticks)
    labels = texts(group(parse(latency_chart()), "y-axis")[0])
    assert labels == ["0", "250", "500", "750", "1k", "1.25k"]   # covers the 1000 ms SLO with headroom
    assert [compact(v) for v in (1200, 250, 0.5, 2.5e6, 0)] == ["1.2k", "250", "0.5", "2.5M", "0"]


def test_y_format_and_fixed_y_max():
    series = [Series("busy", [(NOW - 60, 0.42), (NOW, 0.9)])]
    root = parse(line_chart("Busy", series, y_unit="%", x_window=WINDOW, y_max=1.0, y_format=lambda v: f"{v:.0%}"))
    assert texts(group(root, "y-axis")[0]) == ["0%", "20%", "40%", "60%", "80%", "100%"]


def test_x_axis_ticks_relative_to_the_right_edge():
    root = parse(latency_chart())
    assert texts(group(root, "x-axis")[0]) == ["now", "-1 min", "-2 min", "-3 min", "-4 min", "-5 min"]
    short = line_chart("x", [Series("a", [(NOW - 50, 1.0), (NOW, 2.0)])], y_unit="ms")   # data extent: 50 s
    assert texts(group(parse(short), "x-axis")[0]) == ["now", "-10 s", "-20 s", "-30 s", "-40 s", "-50 s"]
    hour = line_chart("x", [Series("a", [(NOW - 3600, 1.0), (NOW, 2.0)])], y_unit="ms")
    assert texts(group(parse(hour), "x-axis")[0])[:3] == ["now", "-10 min", "-20 min"]


def test_x_window_is_honoured():
    series = [Series("a", [(NOW - 400, 9.0), (NOW - 300, 1.0), (NOW - 100, 2.0), (NOW, 3.0)])]
    root = parse(line_chart("x", series, y_unit="ms", x_window=WINDOW))
    axis = group(root, "x-axis")[0]
    tick_x = {"".join(t.itertext()): float(t.get("x")) for t in axis.iter(f"{NS}text")}
    (points,) = polylines(group(root, "series")[0])
    assert len(points) == 3                       # the point before the window is left out
    assert points[-1][0] == tick_x["now"] == 640 - 18    # right edge of the window = right edge of the plot
    assert points[0][0] == tick_x["-5 min"] == 58
    assert texts(group(root, "y-axis")[0])[-1] == "4"   # the y scale ignores the point outside, too


def test_labels_are_escaped():
    evil = '<script>alert("x")</script>'
    svg = line_chart(evil, [Series(evil, [(NOW - 10, 1.0), (NOW, 2.0)], color='red"/><script>')],
                     y_unit=evil, thresholds=[Threshold(evil, 1.0)], x_window=WINDOW)
    assert "<script" not in svg
    root = parse(svg)
    assert not list(root.iter(f"{NS}script"))
    assert texts(root, "chart-title") == [evil] and texts(root, "unit") == [evil]
    assert texts(root, "threshold-label") == [evil]
    assert root.get("aria-label") == evil


def test_empty_state():
    for series in ([], [Series("p99 worker-a", [(NOW - 10, None), (NOW, None)])]):
        root = parse(line_chart("Online TTFT", series, y_unit="ms", thresholds=[Threshold("SLO 1000 ms", 1000)],
                                x_window=WINDOW))
        assert texts(root, "empty") == ["no data yet"]
        assert texts(root, "chart-title") == ["Online TTFT"] and texts(root, "unit") == ["ms"]
        assert len(texts(group(root, "y-axis")[0])) >= 4 and "now" in texts(group(root, "x-axis")[0])
        assert not list(root.iter(f"{NS}polyline"))
    root = parse(line_chart("Idle", [], y_unit="tokens/s"))   # no window and no data at all
    assert texts(root, "empty") == ["no data yet"]
    assert "no data yet" not in latency_chart()


def test_legend_wraps_under_the_plot():
    series = [Series(f"p99 worker-{i:02d}.example.internal", [(NOW - 60, float(i)), (NOW, i + 1.0)])
              for i in range(10)]
    root = parse(line_chart("Many", series, y_unit="ms", thresholds=[Threshold("SLO", 5.0)], x_window=WINDOW))
    axes_bottom = float(next(p for p in root.iter(f"{NS}path") if p.get("class") == "axes").get("d").split("H")[0]
                        .split("V")[1])
    legend_lines = [next(g.iter(f"{NS}line")) for g in group(root, "legend")]
    rows = sorted({float(line.get("y1")) for line in legend_lines})
    assert len(legend_lines) == 11 and len(rows) >= 3
    assert min(rows) > axes_bottom + 16           # below the x tick labels
    width, height = map(float, root.get("viewBox").split()[2:])
    assert max(rows) < height
    for g in group(root, "legend"):               # entries fit across the chart
        text = next(g.iter(f"{NS}text"))
        assert float(text.get("x")) + 6.2 * len(text.text) <= width


def test_output_is_deterministic():
    assert latency_chart() == latency_chart()
    assert progress_chart("b", [(30, 5), (90, 12)], total=20) == progress_chart("b", [(30, 5), (90, 12)], total=20)


def test_progress_chart():
    points = [(30.0, 4.0), (60.0, 9.0), (150.0, 20.0), (240.0, 31.0)]
    root = parse(progress_chart("Batch batch_abc", points, total=37))
    assert texts(group(root, "x-axis")[0]) == ["0", "+1 min", "+2 min", "+3 min", "+4 min"]
    for label in group(root, "x-axis")[0].iter(f"{NS}text"):   # "+4 min" at the right edge stays inside
        assert float(label.get("x")) + 6.2 * len(label.text) / 2 <= 640
    assert texts(group(root, "y-axis")[0]) == ["0", "10", "20", "30", "40"]
    assert texts(root, "threshold-label") == ["total 37"] and texts(root, "unit") == ["requests"]
    (line,) = polylines(group(root, "series")[0])
    assert line[0] == (58.0, float(root.find(f"{NS}path").get("d").split("H")[0].split("V")[1]))  # starts at 0, 0
    assert line[-1][0] == 640 - 18
    started = progress_chart("b", [(NOW + 30, 1), (NOW + 60, 2)], total=2, start=NOW)
    assert texts(group(parse(started), "y-axis")[0]) == ["0", "1", "2"]   # whole requests only
    assert texts(parse(progress_chart("b", [], total=5)), "empty") == ["no data yet"]


def test_write_sample_artifact():
    out = Path(__file__).resolve().parents[2] / "test-artifacts"
    out.mkdir(exist_ok=True)
    series = [Series("p99 worker-a", [(NOW - 300 + 10 * i, None if 12 <= i <= 14 else 420.0 + 300 * math.sin(i / 4))
                                      for i in range(31)]),
              Series("p50 worker-a", [(NOW - 300 + 10 * i, 150.0 + 40 * math.sin(i / 3)) for i in range(31)],
                     dashed=True),
              Series("p99 worker-b", [(NOW - 180 + 10 * i, 640.0 + 380 * math.sin(i / 5)) for i in range(19)])]
    svg = line_chart("Online TTFT (last 5 min)", series, y_unit="ms", x_window=WINDOW,
                     thresholds=[Threshold("SLO 1000 ms", 1000.0)])
    parse(svg)
    (out / "svg_chart_sample.svg").write_text(svg + "\n")
