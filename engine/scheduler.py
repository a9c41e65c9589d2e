"""Continuous batching: each step, running requests first, then waiting ones, under one token budget.

Following vLLM v1, there are no prefill or decode phases: a request's num_computed_tokens catches up
with its length one scheduled chunk at a time, so a step mixes decodes and prefill chunks freely."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.kv_cache import BlockPool
from engine.request import Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 128             # cap on requests running at once
    max_num_batched_tokens: int = 2048  # token budget of one step
    enable_chunked_prefill: bool = True


@dataclass
class ScheduledChunk:
    request: Request
    num_tokens: int

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the request's last token, so the step samples its next one."""
        return self.request.num_computed_tokens + self.num_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, config: SchedulerConfig, pool: BlockPool):
        self.config = config
        self.pool = pool
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = self._chunk_size(req, budget)
            if n == 0:
                i += 1
                continue
            if not self._reserve_blocks(req, n, out):
                break  # req itself was preempted: nothing after it in the list is left to run either
            out.chunks.append(ScheduledChunk(req, n))
            budget -= n
            i += 1

        # A step that had to preempt is short of memory: admitting more would only thrash.
        while (self.waiting and budget > 0 and not out.preempted
               and len(self.running) < self.config.max_num_seqs):
            req = self.waiting[0]
            n = self._chunk_size(req, budget)
            if n == 0:
                break
            needed = self.pool.blocks_for(req.num_computed_tokens + n) - len(req.block_ids)
            if needed > self.pool.num_free:
                break
            self.waiting.popleft()
            req.block_ids.extend(self.pool.allocate(needed))
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.chunks.append(ScheduledChunk(req, n))
            budget -= n
        return out

    def _chunk_size(self, req: Request, budget: int) -> int:
        remaining = req.num_tokens - req.num_computed_tokens
        if remaining <= budget:
            return remaining
        # Without chunked prefill a prompt waits for a step with room for all of it (prompts longer
        # than a whole step are refused at submission). A preempted request recomputing prompt and
        # output may have outgrown a step, so it is always recomputed in chunks.
        if self.config.enable_chunked_prefill or req.num_output_tokens > 0:
            return budget
        return 0

    def _reserve_blocks(self, req: Request, n: int, out: SchedulerOutput) -> bool:
        """Give req the blocks its next n tokens need, preempting the latest-admitted running requests
        (freeing their blocks; they recompute later) until it fits. False if req had to go itself.

        Requests are visited in running order and victims come from the end, so a victim is never
        one this step already scheduled."""
        needed = self.pool.blocks_for(req.num_computed_tokens + n) - len(req.block_ids)
        while needed > self.pool.num_free:
            victim = self.running[-1]
            self.preempt(victim)
            out.preempted.append(victim)
            if victim is req:
                return False
        req.block_ids.extend(self.pool.allocate(needed))
        return True

    def preempt(self, req: Request) -> None:
        """Free req's blocks and put it back at the front of the queue; it recomputes from scratch."""
        self.running.remove(req)
        self.pool.free(req.block_ids)
        req.block_ids = []
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def finish(self, req: Request) -> None:
        """Remove a finished or aborted request from wherever it is and free its blocks."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.pool.free(req.block_ids)
        req.block_ids = []
        req.status = RequestStatus.FINISHED
