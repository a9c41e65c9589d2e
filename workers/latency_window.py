"""Online latency of the last minute, for heartbeats: the dashboard and the router want *recent* p50/p99,
which a Prometheus histogram (cumulative since start) cannot give."""
from __future__ import annotations

import math
import threading
import time
from collections import deque


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = min(len(ordered), max(1, math.ceil(q / 100 * len(ordered)))) - 1
    return ordered[rank]


class LatencyWindow:
    def __init__(self, horizon_s: float = 60.0):
        self.horizon_s = horizon_s
        self._ttft: deque[tuple[float, float]] = deque()
        self._tpot: deque[tuple[float, float]] = deque()
        self._lock = threading.Lock()

    def add(self, ttft: float | None, tpot: float | None, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            if ttft is not None:
                self._ttft.append((now, ttft))
            if tpot is not None:
                self._tpot.append((now, tpot))

    def percentiles(self, now: float | None = None) -> dict[str, float | None]:
        now = time.monotonic() if now is None else now
        with self._lock:
            for series in (self._ttft, self._tpot):
                while series and series[0][0] < now - self.horizon_s:
                    series.popleft()
            ttft = [v for _, v in self._ttft]
            tpot = [v for _, v in self._tpot]
        return {"ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
                "tpot_p50": percentile(tpot, 50), "tpot_p99": percentile(tpot, 99)}
