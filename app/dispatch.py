"""Celery configuration shared by the gateway (which sends batch shards) and the workers (which run them).

One task, `conserve.run_shard(batch_id, shard)`, on one queue per served model, so a shard only reaches
workers that serve its model. The job store, not the broker, is the source of truth: a shard's requests and
results live in SQL, the task only says "work on this shard", and a duplicate or redelivered task finds its
finished requests already written and skips them."""
from __future__ import annotations

from celery import Celery

SHARD_TASK = "conserve.run_shard"


def offline_queue(model: str) -> str:
    return f"conserve.offline.{model}"


def make_celery(broker_url: str, visibility_timeout_s: float) -> Celery:
    app = Celery("conserve", broker=broker_url, set_as_current=False)
    app.conf.update(
        # A shard is acknowledged only once it is done: a worker that dies mid-shard leaves it unacked, and
        # the broker hands it to another worker (the gateway also re-sends shards whose lease lapsed,
        # which is faster than the visibility timeout).
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # One shard reserved per free slot: shards flow to the workers with idle capacity instead of piling
        # up in one worker's prefetch buffer.
        worker_prefetch_multiplier=1,
        # Set explicitly: an unacknowledged shard is redelivered after this long. Workers hand a shard back
        # (re-sent as a new task) long before it, at a quarter of it (workers/shard_runner.py).
        broker_transport_options={"visibility_timeout": visibility_timeout_s},
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a Redis restart must not end the worker's consumer
        task_ignore_result=True,
        worker_hijack_root_logger=False,
        worker_enable_remote_control=False,  # no pidbox fan-out queues: nobody sends control commands
        worker_send_task_events=False,
        task_default_queue="conserve.offline",
    )
    return app


def send_shard(celery: Celery, batch_id: str, shard: int, model: str) -> None:
    celery.send_task(SHARD_TASK, args=[batch_id, shard], queue=offline_queue(model))
