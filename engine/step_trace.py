"""An opt-in record of the engine's last steps: their shapes, how long they took, and what the scheduler
predicted for them. For diagnosing the SLO-aware scheduler on a device (bench/coserve.py --step-trace):
whether steps sized to the TPOT SLO run as long as planned, and which shapes do not."""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class StepRecord:
    at_s: float                  # when the step was planned, seconds since the engine started
    seconds: float               # planning to its tokens handed out (what Scheduler.observe learns from)
    seqs: int                    # chunks in the step
    decodes: int                 # of them, single-token chunks
    online_tokens: int
    offline_tokens: int
    predicted_s: float | None    # the cost model's seconds, for steps sized to the TPOT SLO; else None
    time_scale: float            # the scheduler's measured/predicted correction when it planned the step
    committed: bool              # False: stopped at a safepoint or failed


class StepTrace:
    """The last `capacity` steps, appended by the engine thread and read from any thread."""

    def __init__(self, capacity: int):
        self._records: deque[StepRecord] = deque(maxlen=capacity)
        self._lock = threading.Lock()

    def append(self, record: StepRecord) -> None:
        with self._lock:
            self._records.append(record)

    def records(self) -> list[StepRecord]:
        with self._lock:
            return list(self._records)
