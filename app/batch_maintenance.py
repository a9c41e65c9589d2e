"""The gateway's background duties for offline jobs, once a second: re-send shards whose worker died (their
lease lapsed: faster than the broker's visibility timeout), expire batches past their completion window,
and finalise batches that are done, cancelled or expired by writing their output and error files.

Every step is a conditional update in the job store, so several gateway replicas can run this at once and
each batch is still finalised exactly once."""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import secrets
import socket
import time

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from app.batch_output import error_line, output_line, write_jsonl
from app.batch_pipeline import BatchPipeline
from app.batch_store import (
    batches_ready_to_finalize,
    begin_expiry,
    claim_finalization,
    complete_finalization,
    create_file,
    due_for_expiry,
    expired_leases,
    final_status_for,
    load_batch,
    queued_shards,
    requeue_shard,
    results_in_order,
    undispatched_batches,
)
from app.broker_watch import BrokerWatch
from app.db import utcnow
from app.dispatch import send_shard
from app.file_storage import FileStorage, new_file_id
from app.models import FILE_PURPOSE_BATCH_OUTPUT, REQUEST_COMPLETED
from app.settings import Settings
from app.worker_registry import alive_workers, latest_samples

log = logging.getLogger(__name__)
# A batch started this long ago and still not dispatched lost its dispatch (a gateway crash or a broker
# outage), rather than being dispatched right now by the request that created it.
STRANDED_AFTER_S = 30.0
ORPHAN_AFTER_S = 10.0
RESEND_EVERY_S = 30.0


class BatchMaintenance:
    def __init__(self, settings: Settings, sessions: sessionmaker[Session], storage: FileStorage, celery: Celery,
                 pipeline: BatchPipeline):
        self.settings = settings
        self.sessions = sessions
        self.storage = storage
        self.celery = celery
        self.pipeline = pipeline
        self.name = f"gateway-{socket.gethostname()}-{secrets.token_hex(4)}"
        self.broker = BrokerWatch(settings.broker_url)
        self._resent: dict[tuple[str, int], float] = {}  # shard -> when its task was last sent again (monotonic)

    async def run_forever(self) -> None:
        try:
            await asyncio.to_thread(self.pipeline.recover)
        except Exception:
            log.exception("could not recover batches left unfinished by an earlier gateway")
        try:
            while True:
                try:
                    await asyncio.to_thread(self.tick)
                except Exception:  # a store or broker outage: try again next round
                    log.exception("batch maintenance failed; retrying")
                await asyncio.sleep(self.settings.batch_maintenance_interval_s)
        finally:
            self.broker.close()

    def tick(self) -> None:
        if self.broker.restarted():
            self.resend_queued_shards()
        self.resend_orphaned_shards()
        self.dispatch_stranded()
        self.resend_lapsed_shards()
        with self.sessions() as s:
            due = [b.id for b in due_for_expiry(s)]
        for batch_id in due:
            with self.sessions() as s:
                if begin_expiry(s, batch_id):
                    log.info("batch %s passed its completion window; unfinished requests expire", batch_id)
        with self.sessions() as s:
            ready = [b.id for b in batches_ready_to_finalize(s)]
        for batch_id in ready:
            self.finalize(batch_id)

    def resend_queued_shards(self) -> None:
        with self.sessions() as s:
            queued = [(sh.batch_id, sh.shard, sh.model) for sh in queued_shards(s)]
        for batch_id, shard, model in queued:
            send_shard(self.celery, batch_id, shard, model)
        if queued:
            log.warning("sent %d queued shards again after the broker restarted", len(queued))

    def resend_orphaned_shards(self) -> None:
        """A worker that died after taking a shard's task from the broker but before claiming it leaves the
        shard queued with its task unacknowledged until the visibility timeout. So while a worker of the
        shard's model sits idle and the shard has waited ORPHAN_AFTER_S, its task is sent again (at most every
        RESEND_EVERY_S; a duplicate is harmless). Busy workers mean a real backlog: nothing is re-sent."""
        with self.sessions() as s:
            queued = [(sh.batch_id, sh.shard, sh.model, sh.updated_at) for sh in queued_shards(s)]
            if not queued:
                return
            workers = alive_workers(s, stale_after_s=self.settings.worker_stale_after_s)
            samples = latest_samples(s, [w.id for w in workers])
        idle_models = {w.model for w in workers if (sample := samples.get(w.id)) is not None
                       and sample.running_offline + sample.waiting_offline == 0}
        now, cutoff = time.monotonic(), utcnow() - dt.timedelta(seconds=ORPHAN_AFTER_S)
        still_queued = {(batch_id, shard) for batch_id, shard, _, _ in queued}
        self._resent = {key: at for key, at in self._resent.items() if key in still_queued}
        for batch_id, shard, model, queued_at in queued:
            key = (batch_id, shard)
            if model in idle_models and queued_at <= cutoff and now - self._resent.get(key, -RESEND_EVERY_S) >= RESEND_EVERY_S:
                self._resent[key] = now
                log.warning("shard %s/%d has waited since %s while a worker of %s is idle; sending it again",
                            batch_id, shard, queued_at.isoformat(timespec="seconds"), model)
                send_shard(self.celery, batch_id, shard, model)

    def dispatch_stranded(self) -> None:
        """Batches whose dispatch failed part-way (the broker was down) are sent again once it is back."""
        with self.sessions() as s:
            stranded = [b.id for b in undispatched_batches(
                s, started_before=utcnow() - dt.timedelta(seconds=STRANDED_AFTER_S))]
        for batch_id in stranded:
            self.pipeline.dispatch(batch_id)

    def resend_lapsed_shards(self) -> None:
        with self.sessions() as s:
            lapsed = [(sh.batch_id, sh.shard, sh.model, sh.worker_id) for sh in expired_leases(s)]
        for batch_id, shard, model, worker_id in lapsed:
            with self.sessions() as s:
                if not requeue_shard(s, batch_id, shard):
                    continue
            log.warning("shard %s/%d: worker %s stopped renewing its lease; sending it again", batch_id, shard,
                        worker_id)
            send_shard(self.celery, batch_id, shard, model)

    def finalize(self, batch_id: str) -> None:
        with self.sessions() as s:
            if not claim_finalization(s, batch_id, self.name):
                return
            batch = load_batch(s, batch_id)
            final_status = final_status_for(batch)
            owner = batch.owner
        output_id, error_id = new_file_id(), new_file_id()
        with self.storage.writer(output_id) as out, self.storage.writer(error_id) as err, \
                self.sessions() as s:
            outputs = errors = 0
            for req in results_in_order(s, batch_id):
                if req.status == REQUEST_COMPLETED:
                    outputs += write_jsonl(out, [output_line(req.request_id, req.custom_id, req.status_code,
                                                             req.response)])
                else:
                    errors += write_jsonl(err, [error_line(req.request_id, req.custom_id,
                                                           status_code=req.status_code, body=req.response,
                                                           error=req.error)])
        # A file only where there is something in it, as OpenAI does.
        files = {"output": (output_id, outputs), "error": (error_id, errors)}
        with self.sessions() as s:
            for kind, (file_id, size) in files.items():
                if size:
                    create_file(s, file_id=file_id, owner=owner, purpose=FILE_PURPOSE_BATCH_OUTPUT,
                                filename=f"{batch_id}_{kind}.jsonl", size=size)
                else:
                    self.storage.delete(file_id)
            done = complete_finalization(s, batch_id, finalizer=self.name, final_status=final_status,
                                         output_file_id=output_id if outputs else None,
                                         error_file_id=error_id if errors else None)
        if not done:  # another gateway took the batch over meanwhile; its files are the ones that count
            for file_id, _ in files.values():
                self.storage.delete(file_id)
            log.warning("batch %s was finalised elsewhere; discarded this gateway's files", batch_id)
            return
        log.info("batch %s %s: %d output bytes, %d error bytes", batch_id, final_status, outputs, errors)
