"""Which worker serves an online request: one alive worker of the requested model with the least load.

The alive set comes from the job store's heartbeats (re-read at most every REFRESH_S); load is the gateway's
own count of requests in flight per worker, ties broken by the worker's reported online queue. A worker that
refused a connection is skipped for SUSPECT_S even if its last heartbeat still looks fresh."""
from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from app.errors import model_not_found, overloaded
from app.worker_registry import alive_workers, latest_samples

REFRESH_S = 1.0
SUSPECT_S = 5.0


@dataclass(frozen=True)
class WorkerView:
    id: str
    url: str
    model: str
    max_model_len: int
    online_queue: int  # running + waiting online requests at the last heartbeat


class WorkerRouter:
    def __init__(self, sessions: sessionmaker[Session], stale_after_s: float, max_inflight_per_worker: int):
        self.sessions = sessions
        self.stale_after_s = stale_after_s
        self.max_inflight = max_inflight_per_worker
        self.inflight: dict[str, int] = defaultdict(int)
        self._suspect_until: dict[str, float] = {}
        self._workers: list[WorkerView] = []
        self._read_at = float("-inf")
        self._refresh_lock = asyncio.Lock()

    def _read_store(self) -> list[WorkerView]:
        with self.sessions() as s:
            workers = alive_workers(s, stale_after_s=self.stale_after_s)
            samples = latest_samples(s, [w.id for w in workers])
        views = []
        for w in workers:
            sample = samples.get(w.id)
            queue = 0 if sample is None else sample.running_online + sample.waiting_online
            views.append(WorkerView(w.id, w.url, w.model, w.max_model_len, queue))
        return views

    async def workers(self) -> list[WorkerView]:
        """Alive workers, not counting those that failed a connection moments ago."""
        async with self._refresh_lock:
            if time.monotonic() - self._read_at > REFRESH_S:
                self._workers = await asyncio.to_thread(self._read_store)
                self._read_at = time.monotonic()
        now = time.monotonic()
        return [w for w in self._workers if self._suspect_until.get(w.id, 0.0) <= now]

    async def models(self) -> list[str]:
        return sorted({w.model for w in await self.workers()})

    async def choose(self, model: str, exclude: set[str] = frozenset()) -> WorkerView:
        """The least-loaded alive worker serving `model`; 503 when none is alive, 404 for a model nobody
        serves, 429 when every worker of the model is at capacity."""
        alive = [w for w in await self.workers() if w.id not in exclude]
        if not alive:
            raise overloaded("no worker is available right now; retry shortly", retry_after_s=1)
        candidates = [w for w in alive if w.model == model]
        if not candidates:
            raise model_not_found(model)
        open_ = [w for w in candidates if self.inflight[w.id] < self.max_inflight]
        if not open_:
            raise overloaded(f"all workers serving '{model}' are at capacity; retry shortly", status_code=429,
                             retry_after_s=1)
        random.shuffle(open_)  # equal loads spread evenly instead of always picking the first
        return min(open_, key=lambda w: (self.inflight[w.id], w.online_queue))

    def acquire(self, worker: WorkerView) -> None:
        self.inflight[worker.id] += 1

    def release(self, worker: WorkerView) -> None:
        self.inflight[worker.id] -= 1

    def suspect(self, worker: WorkerView) -> None:
        """The worker failed a connection or died mid-request: route around it until its heartbeat proves it
        alive again (the store is re-read after SUSPECT_S)."""
        self._suspect_until[worker.id] = time.monotonic() + SUSPECT_S
