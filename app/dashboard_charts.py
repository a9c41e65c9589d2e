"""The dashboard's charts, from dashboard_data to SVG (app/svg_charts.py draws them)."""
from __future__ import annotations

from collections import defaultdict

from app.dashboard_data import JobDetail, LiveSeries
from app.svg_charts import Series, Threshold, line_chart, progress_chart

BUCKET_S = 5.0  # heartbeats of several workers are aligned on 5-second buckets for the fleet totals


def live_charts(live: LiveSeries) -> list[str]:
    window = (live.since, live.until)
    several = len(live.by_worker) > 1

    def latency(field: str, label: str) -> list[Series]:
        out = []
        if several:  # the fleet: the worst worker's p99 in each bucket (percentiles do not add up)
            out.append(Series(f"{label} p99 · worst worker", [(t, None if v is None else v * 1000) for t, v in
                                                              _combined(live, f"{field}_p99", max)]))
        for worker, fields in sorted(live.by_worker.items()):
            suffix = f" · {worker}" if several else ""
            for quantile, dashed in (("p99", False), ("p50", True)):
                points = [(t, None if v is None else v * 1000) for t, v in fields[f"{field}_{quantile}"]]
                out.append(Series(f"{label} {quantile}{suffix}", points, dashed=dashed))
        return out

    ttft_slo = [Threshold(f"SLO {live.slo_ttft_ms:.0f} ms", live.slo_ttft_ms)] if live.slo_ttft_ms else []
    tpot_slo = [Threshold(f"SLO {live.slo_tpot_ms:.0f} ms", live.slo_tpot_ms)] if live.slo_tpot_ms else []
    throughput: list[Series] = []
    for klass, dashed in (("offline", False), ("online", True)):
        name = "offline (harvested)" if klass == "offline" else "online"
        if several:
            throughput.append(Series(f"{name} · all workers", _summed(live, f"{klass}_tokens_per_s"), dashed=dashed))
        else:
            for fields in live.by_worker.values():
                throughput.append(Series(name, fields[f"{klass}_tokens_per_s"], dashed=dashed))
    busy = [Series(f"busy{' · ' + w if several else ''}", [(t, None if v is None else 100 * v) for t, v in
                                                             f["busy_fraction"]]) for w, f in sorted(live.by_worker.items())]
    return [
        line_chart("Online time to first token", latency("ttft", "TTFT"), y_unit="ms", thresholds=ttft_slo,
                   x_window=window),
        line_chart("Online time per output token", latency("tpot", "TPOT"), y_unit="ms", thresholds=tpot_slo,
                   x_window=window),
        line_chart("Generated tokens per second", throughput, y_unit="tokens/s", x_window=window),
        line_chart("Engine busy time", busy, y_unit="% of time", x_window=window, y_max=100),
    ]


def _summed(live: LiveSeries, field: str) -> list[tuple[float, float | None]]:
    """The fleet's total per time bucket: each worker's latest reading in the bucket, added up."""
    return _combined(live, field, sum)


def _combined(live: LiveSeries, field: str, combine) -> list[tuple[float, float | None]]:
    buckets: dict[float, dict[str, float]] = defaultdict(dict)
    for worker, fields in live.by_worker.items():
        for t, v in fields[field]:
            if v is not None:
                buckets[t - t % BUCKET_S][worker] = v
    return [(t + BUCKET_S / 2, combine(values.values())) for t, values in sorted(buckets.items())]


def progress_svg(detail: JobDetail) -> str:
    return progress_chart("Requests finished", detail.progress, total=max(detail.row.total, 1))
