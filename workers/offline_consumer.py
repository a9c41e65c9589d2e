"""The worker's Celery consumers: WorkControllers on threads of the worker process (the engine lives here, so
shards must run here too), consuming only the offline queue of the model this worker serves.

One solo-pool consumer per slot, each with its own app and broker connection, rather than one consumer with a
thread pool: with the thread pool, acknowledgements are sent from the pool's threads, and after a broker
restart the consumer's own loop never noticed the lost connection (measured: it never reconnected). A solo
consumer runs its shard, acknowledges it and polls the broker all on one thread, and reconnects by itself."""
from __future__ import annotations

import logging
import threading
from typing import Callable

from celery import Celery

from app.dispatch import SHARD_TASK, offline_queue
from workers.shard_runner import ShardRunner

log = logging.getLogger(__name__)


class OfflineConsumer:
    def __init__(self, make_app: Callable[[], Celery], runner: ShardRunner, model: str, worker_id: str,
                 slots: int = 2):
        self.runner = runner
        self.controllers = []
        self._threads = []
        def run_shard(batch_id: str, shard: int) -> str:
            return runner.run(batch_id, shard)

        for slot in range(slots):
            celery = make_app()
            celery.task(name=SHARD_TASK)(run_shard)
            celery.finalize()
            controller = celery.WorkController(
                pool_cls="solo", concurrency=1, queues=[offline_queue(model)],
                hostname=f"{worker_id}-{slot}@conserve", loglevel="WARNING", without_heartbeat=True,
                without_mingle=True, without_gossip=True, ready_callback=lambda *_: None)
            self.controllers.append(controller)
            self._threads.append(threading.Thread(target=self._serve, args=(controller,), daemon=True,
                                                  name=f"conserve-offline-consumer-{slot}"))

    @staticmethod
    def _serve(controller) -> None:
        try:
            controller.start()
        except Exception:
            log.exception("an offline consumer stopped")

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 15.0) -> None:
        """Hand running shards back (they are re-sent for another worker) and stop consuming."""
        self.runner.stopping.set()
        for controller in self.controllers:
            controller.stop(in_sighandler=False)
        for thread in self._threads:
            thread.join(timeout)
