"""The worker's Celery consumer: a WorkController on a thread of the worker process (the engine lives here,
so tasks must run here too), with a small thread pool — one thread per shard this worker runs at once —
consuming only the offline queue of the model it serves."""
from __future__ import annotations

import logging
import threading

from celery import Celery

from app.dispatch import SHARD_TASK, offline_queue
from workers.shard_runner import ShardRunner

log = logging.getLogger(__name__)


class OfflineConsumer:
    def __init__(self, celery: Celery, runner: ShardRunner, model: str, worker_id: str, slots: int = 2):
        self.celery = celery
        self.runner = runner

        @celery.task(name=SHARD_TASK)
        def run_shard(batch_id: str, shard: int) -> str:
            return runner.run(batch_id, shard)

        celery.finalize()
        self.controller = celery.WorkController(
            pool_cls="threads", concurrency=slots, queues=[offline_queue(model)], hostname=f"{worker_id}@conserve",
            loglevel="WARNING", without_heartbeat=True, without_mingle=True, without_gossip=True,
            ready_callback=lambda *_: None)
        self._thread = threading.Thread(target=self._serve, name="conserve-offline-consumer", daemon=True)

    def _serve(self) -> None:
        try:
            self.controller.start()
        except Exception:
            log.exception("the offline consumer stopped")

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 15.0) -> None:
        """Hand running shards back (they are re-sent for another worker) and stop consuming."""
        self.runner.stopping.set()
        self.controller.stop(in_sighandler=False)
        self._thread.join(timeout)
