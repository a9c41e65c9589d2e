"""The worker's registration and heartbeat in the SQL store: the gateway routes by what is there, the dashboard
charts it. A database outage must never take the engine down, so failures are logged and retried."""
from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

from sqlalchemy.orm import Session, sessionmaker

from app.db import utcnow
from app.worker_registry import (
    UnknownWorkerError,
    mark_offline,
    prune_samples,
    record_heartbeat,
    register_worker,
)

log = logging.getLogger(__name__)


@dataclass
class WorkerIdentity:
    worker_id: str
    url: str
    model: str
    device: str
    policy: str
    slo_ttft_ms: float
    slo_tpot_ms: float
    max_model_len: int


class Heartbeat:
    def __init__(self, sessions: sessionmaker[Session], identity: WorkerIdentity, sample: Callable[[], dict],
                 interval_s: float = 2.0, retention_s: float = 3600.0):
        self.sessions = sessions
        self.identity = identity
        self.sample = sample
        self.interval_s = interval_s
        self.retention_s = retention_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="conserve-heartbeat", daemon=True)
        self._beats = 0

    def register(self) -> None:
        i = self.identity
        with self.sessions() as s:
            register_worker(s, worker_id=i.worker_id, url=i.url, model=i.model, device=i.device, policy=i.policy,
                            slo_ttft_ms=i.slo_ttft_ms, slo_tpot_ms=i.slo_tpot_ms, hostname=socket.gethostname(),
                            pid=os.getpid(), max_model_len=i.max_model_len)

    def start(self) -> None:
        self.register()
        self.sample()  # the first reading only sets the baseline of the rates
        self._thread.start()

    def beat(self) -> None:
        sample = self.sample()
        with self.sessions() as s:
            try:
                record_heartbeat(s, self.identity.worker_id, sample)
            except UnknownWorkerError:
                # The row went away (database reset, or a gateway pruned it): register again.
                s.rollback()
                self.register()
                record_heartbeat(s, self.identity.worker_id, sample)
            self._beats += 1
            # Each worker keeps its own time series bounded; every 30 beats is often enough.
            if self._beats % 30 == 1:
                prune_samples(s, utcnow() - timedelta(seconds=self.retention_s))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.beat()
            except Exception:
                log.exception("heartbeat to the job store failed; retrying in %.0f s", self.interval_s)

    def stop(self) -> None:
        """Stop beating and mark the worker offline, so the gateway stops routing to it at once."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        try:
            with self.sessions() as s:
                mark_offline(s, self.identity.worker_id)
        except Exception:
            log.exception("could not mark the worker offline; it will go stale instead")
