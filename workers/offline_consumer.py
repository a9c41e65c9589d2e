"""The worker's Celery consumers: WorkControllers on threads of the worker process (the engine lives here, so
shards must run here too), consuming only the offline queue of the model this worker serves.

One solo-pool consumer per slot, each with its own app and broker connection, rather than one consumer with a
thread pool: with the thread pool, acknowledgements are sent from the pool's threads, and after a broker
restart the consumer's own loop never noticed the lost connection. Even solo consumers that were running a
shard when the broker went down sometimes never reconnected (seen under load), and once (on a clean CI run,
after a cancelled batch) consumers stopped taking tasks without any broker restart. So a watchdog replaces
every consumer when the broker's run_id changes, or when tasks wait in this model's queue while no shard
runs here for several checks in a row."""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from celery import Celery

from app.broker_watch import BrokerWatch
from app.dispatch import SHARD_TASK, offline_queue
from workers.shard_runner import ShardRunner

log = logging.getLogger(__name__)
WATCH_INTERVAL_S = 2.0
# Checks in a row with tasks queued and nothing running before the consumers count as stuck (a consumer
# that just finished a shard takes the next task within milliseconds).
STUCK_CHECKS = 3


class OfflineConsumer:
    def __init__(self, make_app: Callable[[], Celery], runner: ShardRunner, model: str, worker_id: str,
                 broker_url: str, slots: int = 2):
        self.make_app = make_app
        self.runner = runner
        self.model = model
        self.worker_id = worker_id
        self.slots = slots
        self.broker_url = broker_url
        self.controllers: list = []
        self._threads: list[threading.Thread] = []
        self._generation = 0
        self._stopped = threading.Event()
        # One callable for every app's task: Celery keeps one callable per task name in the process, and a
        # fresh bound method per app counted as "a different callable" that it refused to register.
        self._task = self._run_shard
        self._watchdog = threading.Thread(target=self._watch, name="conserve-broker-watch", daemon=True)

    def _run_shard(self, batch_id: str, shard: int) -> str:
        return self.runner.run(batch_id, shard)

    def _start_consumers(self) -> None:
        self._generation += 1
        self.controllers, self._threads = [], []
        for slot in range(self.slots):
            celery = self.make_app()
            celery.task(name=SHARD_TASK)(self._task)
            celery.finalize()
            controller = celery.WorkController(
                pool_cls="solo", concurrency=1, queues=[offline_queue(self.model)],
                hostname=f"{self.worker_id}-{slot}.{self._generation}@conserve", loglevel="WARNING",
                without_heartbeat=True, without_mingle=True, without_gossip=True, ready_callback=lambda *_: None)
            thread = threading.Thread(target=self._serve, args=(controller,), daemon=True,
                                      name=f"conserve-offline-consumer-{slot}")
            self.controllers.append(controller)
            self._threads.append(thread)
            thread.start()

    @staticmethod
    def _serve(controller) -> None:
        try:
            controller.start()
        except Exception:
            log.exception("an offline consumer stopped")

    def _watch(self) -> None:
        watch = BrokerWatch(self.broker_url)
        try:
            watch.restarted()  # the baseline run_id
            idle_with_work = 0
            while not self._stopped.wait(WATCH_INTERVAL_S):
                if self._stopped.is_set():
                    break
                if watch.restarted():
                    self._replace_consumers("the broker restarted")
                    idle_with_work = 0
                    continue
                # Tasks waiting in our queue while no shard runs here: the consumers stopped consuming.
                idle_with_work = idle_with_work + 1 if self.runner.active == 0 and self._queued(watch) else 0
                if idle_with_work >= STUCK_CHECKS:
                    self._replace_consumers("tasks are waiting in the queue but the consumers take none")
                    idle_with_work = 0
        finally:
            watch.close()

    def _replace_consumers(self, why: str) -> None:
        log.warning("%s: replacing the offline consumers", why)
        old = self.controllers
        self._start_consumers()
        for controller in old:  # a stuck consumer must not hold up its replacement
            threading.Thread(target=controller.stop, kwargs={"in_sighandler": False}, daemon=True).start()

    def _queued(self, watch: BrokerWatch) -> bool:
        try:
            return watch.client.llen(offline_queue(self.model)) > 0
        except Exception:  # the broker is unreachable: the consumers' own reconnection handles it
            return False

    def start(self) -> None:
        self._start_consumers()
        self._watchdog.start()

    def stop(self, timeout: float = 8.0) -> None:
        """Hand running shards back (they are re-sent for another worker) and stop consuming, within
        `timeout` in all (the process exits anyway; unacknowledged shards are redelivered)."""
        self._stopped.set()
        self.runner.stopping.set()
        for controller in self.controllers:
            threading.Thread(target=controller.stop, kwargs={"in_sighandler": False}, daemon=True).start()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
