"""Runs one batch shard on this worker's engine: hands it straight back (unclaimed, for a worker with idle
capacity) if the engine has no room for more offline work, else claims the shard's lease in the job store, feeds its pending
requests to the engine as offline work while the engine has room, writes each result as it completes, and
stops within a poll interval when the batch is cancelled or expires.

A shard never outlives a quarter of the broker's visibility timeout: past that it hands the rest back (a new
task for the same shard) so the broker never redelivers a shard that is still running."""
from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from pydantic import ValidationError
from sqlalchemy import select

from app import openai_schemas as oa
from app.batch_store import (
    batch_status,
    claim_shard,
    finish_shard,
    pending_requests,
    record_result,
    release_shard,
    renew_shard,
)
from app.errors import describe_validation_errors, error_body
from app.models import Batch, BatchShard
from engine.errors import InvalidRequestError
from workers.engine_host import EngineHost

log = logging.getLogger(__name__)
# How long a newly taken shard waits for room in the engine before going back to the queue.
ROOM_WAIT_S = 2.0


@dataclass(frozen=True)
class PendingRequest:
    pk: int
    request_id: str
    custom_id: str
    body: dict[str, Any]


class ShardRunner:
    def __init__(self, host: EngineHost, sessions, worker_id: str,
                 hand_back: Callable[[str, int, str], None], *, lease_s: float = 30.0,
                 max_shard_s: float = 900.0, poll_s: float = 0.25, queue_depth: int = 8):
        self.host = host
        self.sessions = sessions
        self.worker_id = worker_id
        self.hand_back = hand_back          # (batch_id, shard, model): send the shard's task again
        self.lease_s = lease_s
        self.max_shard_s = max_shard_s
        self.poll_s = poll_s
        # Offline requests allowed to wait in the engine's queue: enough to keep its batches full, few
        # enough that a busy engine stops pulling work other workers could do.
        self.queue_depth = queue_depth
        self.stopping = threading.Event()   # set on worker shutdown: shards are handed back at once
        self.active = 0                     # shards running now (the consumers' watchdog reads it)
        self._active_lock = threading.Lock()

    def run(self, batch_id: str, shard: int) -> str:
        with self._active_lock:
            self.active += 1
        try:
            return self._claim_and_run(batch_id, shard)
        finally:
            with self._active_lock:
                self.active -= 1

    def _claim_and_run(self, batch_id: str, shard: int) -> str:
        if not self._room_for_more():
            # Busy with other offline work (or online load): the shard goes back to the queue for a worker
            # with idle capacity instead of waiting here.
            with self.sessions() as s:
                model = s.scalar(select(BatchShard.model).where(BatchShard.batch_id == batch_id,
                                                                BatchShard.shard == shard))
            if model is not None:
                self.hand_back(batch_id, shard, model)
            log.info("shard %s/%d handed back unclaimed: the engine has no room for more offline work",
                     batch_id, shard)
            return "no_room"
        with self.sessions() as s:
            outcome = claim_shard(s, batch_id, shard, self.worker_id, self.lease_s)
        if outcome != "claimed":
            log.info("shard %s/%d not run here: %s", batch_id, shard, outcome)
            return outcome
        return asyncio.run(self._run(batch_id, shard))

    def _room_for_more(self) -> bool:
        """Whether the engine's offline queue has room, waiting up to ROOM_WAIT_S for it to drain."""
        deadline = time.monotonic() + ROOM_WAIT_S
        while self.host.offline_waiting() >= self.queue_depth:
            if time.monotonic() >= deadline or self.stopping.is_set():
                return False
            time.sleep(self.poll_s)
        return True

    def _load(self, batch_id: str, shard: int) -> tuple[Batch, list[PendingRequest], str]:
        with self.sessions() as s:
            batch = s.get(Batch, batch_id)
            rows = pending_requests(s, batch_id, shard)
        todo = [PendingRequest(r.id, r.request_id, r.custom_id, r.body) for r in rows]
        return batch, todo, rows[0].model if rows else ""

    async def _run(self, batch_id: str, shard: int) -> str:
        batch, todo, model = await asyncio.to_thread(self._load, batch_id, shard)
        schema = oa.ChatCompletionRequest if batch.endpoint == "/v1/chat/completions" else oa.CompletionRequest
        kind = "chat" if schema is oa.ChatCompletionRequest else "text"
        deadline = batch.expires_at.timestamp()
        queue = deque(todo)
        running: set[asyncio.Task] = set()
        started = time.monotonic()
        next_renew = started + self.lease_s / 3
        next_poll = started
        outcome = "done"
        try:
            while queue or running:
                if time.monotonic() >= next_poll:
                    next_poll = time.monotonic() + self.poll_s
                    if await asyncio.to_thread(self._status, batch_id) != "in_progress":
                        outcome = "stopped"  # cancelled or expired: the gateway closes what is left
                        break
                if time.monotonic() >= next_renew:
                    if not await asyncio.to_thread(self._renew, batch_id, shard):
                        outcome = "lost"  # our lease lapsed and another worker holds the shard now
                        break
                    next_renew = time.monotonic() + self.lease_s / 3
                handing_back = self.stopping.is_set() or time.monotonic() - started > self.max_shard_s
                if handing_back:
                    outcome = "handed_back"
                    if self.stopping.is_set() or not running:
                        break
                while queue and not handing_back and self.host.offline_waiting() < self.queue_depth:
                    req = queue.popleft()
                    running.add(asyncio.ensure_future(self._one(req, schema, kind, deadline)))
                if running:
                    done, running = await asyncio.wait(running, timeout=self.poll_s,
                                                       return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        if task.exception() is not None:
                            log.error("batch request failed in the worker", exc_info=task.exception())
                else:
                    await asyncio.sleep(self.poll_s)
        finally:
            for task in running:
                task.cancel()  # closes the request's stream: the engine aborts it
            if running:
                await asyncio.wait(running)
        if outcome == "handed_back":
            await asyncio.to_thread(self._hand_back, batch_id, shard, model)
        elif outcome == "done":
            await asyncio.to_thread(self._finish, batch_id, shard)
        log.info("shard %s/%d: %s", batch_id, shard, outcome)
        return outcome

    async def _one(self, req: PendingRequest, schema, kind: str, deadline: float) -> None:
        try:
            parsed = schema.model_validate(req.body)
            # A fresh engine id per attempt: a shard that was handed back may run again on this very engine.
            stream = self.host.submit(parsed.engine_prompt(), parsed.sampling_params(), "offline",
                                      request_id=f"{req.request_id}-{uuid.uuid4().hex[:8]}", deadline=deadline)
        except ValidationError as exc:
            message, param = describe_validation_errors(exc.errors())
            await self._record(req, "failed", 400, error_body(message, "invalid_request_error", param))
            return
        except InvalidRequestError as exc:
            await self._record(req, "failed", 400, error_body(str(exc), "invalid_request_error"))
            return
        parts: list[str] = []
        async for event in self.host.events(stream, "offline"):
            if "error" in event:
                await self._record(req, "failed", 500, error_body(f"the engine failed: {event['error']}",
                                                                  "server_error"))
                return
            parts.append(event["delta"])
            if event["finished"]:
                if event["finish_reason"] == "abort":
                    return  # stopped on purpose (cancel, shutdown): the request stays pending
                usage = oa.usage(event["prompt_tokens"], event["completion_tokens"])
                build = oa.chat_completion if kind == "chat" else oa.text_completion
                body = build(oa.new_completion_id(kind), parsed.model, oa.now(), "".join(parts),
                             event["finish_reason"], usage)
                await self._record(req, "completed", 200, body)

    async def _record(self, req: PendingRequest, status: str, status_code: int, response: dict) -> None:
        def write() -> None:
            with self.sessions() as s:
                record_result(s, req.pk, status=status, status_code=status_code, response=response,
                              worker_id=self.worker_id)
        await asyncio.to_thread(write)

    def _status(self, batch_id: str) -> str | None:
        with self.sessions() as s:
            return batch_status(s, batch_id)

    def _renew(self, batch_id: str, shard: int) -> bool:
        with self.sessions() as s:
            return renew_shard(s, batch_id, shard, self.worker_id, self.lease_s)

    def _finish(self, batch_id: str, shard: int) -> None:
        with self.sessions() as s:
            finish_shard(s, batch_id, shard, self.worker_id)

    def _hand_back(self, batch_id: str, shard: int, model: str) -> None:
        with self.sessions() as s:
            release_shard(s, batch_id, shard, self.worker_id)
        self.hand_back(batch_id, shard, model)
