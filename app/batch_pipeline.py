"""A batch's way from upload to workers, on the gateway: validate the input file line by line, store one row
per request, split them into shards and send each shard to the broker. Every step is recorded in the job
store before the next, so a gateway that crashes anywhere in between picks the batch up again on restart
(`recover`), and a shard sent twice is harmless (workers claim shards with a lease)."""
from __future__ import annotations

import asyncio
import logging

from celery import Celery
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.batch_store import (
    add_requests,
    fail_validation,
    mark_dispatched,
    shards_of,
    start_batch,
    undispatched_batches,
    validating_batches,
)
from app.batch_validation import iter_batch_requests, validate_batch_file
from app.dispatch import send_shard
from app.file_storage import FileStorage
from app.models import Batch, BatchRequest
from app.settings import Settings
from app.worker_registry import alive_workers

log = logging.getLogger(__name__)


class BatchPipeline:
    def __init__(self, settings: Settings, sessions: sessionmaker[Session], storage: FileStorage, celery: Celery):
        self.settings = settings
        self.sessions = sessions
        self.storage = storage
        self.celery = celery
        self._tasks: set[asyncio.Task] = set()

    def accept(self, batch_id: str) -> None:
        """Validate and dispatch a new batch in the background; the caller answers `validating` at once."""
        task = asyncio.get_running_loop().create_task(asyncio.to_thread(self.validate_and_dispatch, batch_id))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("batch validation failed", exc_info=task.exception())

    def validate_and_dispatch(self, batch_id: str) -> None:
        if self._validate(batch_id):
            self.dispatch(batch_id)

    def _validate(self, batch_id: str) -> bool:
        """True once the batch is in progress with its requests stored (False: it failed or went elsewhere)."""
        with self.sessions() as s:
            batch = s.get(Batch, batch_id)
            if batch is None or batch.status != "validating":
                return False
            endpoint, file_id = batch.endpoint, batch.input_file_id
            stored = s.execute(select(BatchRequest.shard, BatchRequest.model).where(
                BatchRequest.batch_id == batch_id).distinct()).all()
            max_model_len = max((w.max_model_len for w in alive_workers(
                s, stale_after_s=self.settings.worker_stale_after_s)), default=None)
        if stored:  # a crash after the requests were stored: only the start is missing
            with self.sessions() as s:
                return start_batch(s, batch_id, sorted(set(stored)))
        if not self.storage.exists(file_id):
            with self.sessions() as s:
                fail_validation(s, batch_id, [{"code": "file_not_found", "param": "input_file_id", "line": None,
                                               "message": f"the input file {file_id} no longer exists"}])
            return False
        path = self.storage.path(file_id)
        errors = validate_batch_file(path, endpoint, max_requests=self.settings.max_batch_requests,
                                     max_model_len=max_model_len)
        with self.sessions() as s:
            if errors:
                fail_validation(s, batch_id, errors)
                log.info("batch %s failed validation: %s", batch_id, errors[0]["message"])
                return False
            shards: dict[int, str] = {}

            def rows():
                for row in iter_batch_requests(path, endpoint, self.settings.shard_size):
                    shards[row["shard"]] = row["model"]
                    yield row

            count = add_requests(s, batch_id, rows())
            started = start_batch(s, batch_id, sorted(shards.items()))
        log.info("batch %s: %d requests in %d shards", batch_id, count, len(shards))
        return started

    def dispatch(self, batch_id: str) -> None:
        with self.sessions() as s:
            shards = [(sh.shard, sh.model) for sh in shards_of(s, batch_id) if sh.status == "queued"]
        for shard, model in shards:
            send_shard(self.celery, batch_id, shard, model)
        with self.sessions() as s:
            mark_dispatched(s, batch_id)

    def recover(self) -> None:
        """At start: finish what a previous gateway left half-done."""
        with self.sessions() as s:
            validating = [b.id for b in validating_batches(s)]
            undispatched = [b.id for b in undispatched_batches(s)]
        for batch_id in validating:
            self.validate_and_dispatch(batch_id)
        for batch_id in undispatched:
            self.dispatch(batch_id)
