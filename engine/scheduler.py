"""Continuous batching under one token budget per step, with request classes and co-serving policies.

Following vLLM v1, there are no prefill or decode phases: a request's num_computed_tokens catches up
with its length one scheduled chunk at a time, so a step mixes decodes and prefill chunks freely.

Policies (engine/policy.py): `fcfs` keeps one queue in arrival order. The class-aware policies schedule
running online requests, then waiting online ones, then offline work; when blocks or running seats
(max_num_seqs) run out, offline requests are evicted first. `conserve` adds the SLO-aware token budget:
while online requests are in flight, offline tokens only fill a step up to the predicted time the TPOT
SLO allows (none at all beside an online prefill chunk, whose first token waits on the step), a share of
the pool and of the running seats stays free for online bursts, evictions pick the request with the
least KV not yet checkpointed, and evicted requests come back from their host checkpoint instead of
recomputing."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Protocol

from engine.kv_cache import BlockPool
from engine.policy import Policy
from engine.request import Request, RequestClass, RequestStatus

# Steps beside online decodes are planned to this share of the TPOT SLO: the rest absorbs the noise
# of single steps. The model's systematic error, and the time a step spends outside the model (sampling,
# scheduling, streaming), are learnt while serving: see Scheduler.observe.
TPOT_PLANNING_SHARE = 0.85
# Weight of the newest step in the running measured/predicted ratio, and the bounds it is kept in.
TIME_SCALE_WEIGHT = 0.2
TIME_SCALE_BOUNDS = (0.5, 4.0)


class StepCostModel(Protocol):
    def predict(self, chunks: Iterable[tuple[int, int]]) -> float:
        """Seconds for a step of chunks given as (new tokens, tokens already cached)."""


class KVCheckpoints(Protocol):
    def settle(self, req: Request) -> None: ...
    def restorable(self, req: Request) -> int: ...
    def restore(self, req: Request, num_tokens: int) -> None: ...
    def on_evict(self, req: Request) -> None: ...
    def drop(self, req: Request) -> None: ...


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 128             # cap on requests running at once
    max_num_batched_tokens: int = 2048  # token budget of one step
    enable_chunked_prefill: bool = True
    policy: Policy = Policy.FCFS
    offline_max_batched_tokens: int | None = None  # budget of steps without online work (conserve)
    slo_tpot_s: float = 0.1
    online_reserve_blocks: int = 0      # free blocks offline admission leaves for online bursts (conserve)
    online_reserve_seats: int = 0       # running seats (of max_num_seqs) offline admission leaves (conserve)


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
    restored_tokens: int = 0
    # Set when the step was sized to the TPOT SLO: the seconds the cost model predicts for it.
    predicted_s: float | None = None

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def has_online(self) -> bool:
        return any(c.request.online for c in self.chunks)

    @property
    def has_offline(self) -> bool:
        return any(not c.request.online for c in self.chunks)


class Scheduler:
    def __init__(self, config: SchedulerConfig, pool: BlockPool, cost_model: StepCostModel | None = None,
                 checkpoints: KVCheckpoints | None = None):
        self.config = config
        self.pool = pool
        self.policy = config.policy
        self.cost_model = cost_model
        self.checkpoints = checkpoints
        # fcfs keeps everything in the online queue: one queue, arrival order.
        self._queues = {RequestClass.ONLINE: deque(), RequestClass.OFFLINE: deque()}
        self.running: list[Request] = []
        self.num_preemptions = 0
        # Measured / predicted seconds of SLO-sized steps, smoothed: corrects the profile to what steps
        # really take here and now (measured: the profile alone under-predicted such steps by 10-20%).
        self.time_scale = 1.0

    @property
    def waiting(self) -> list[Request]:
        return [*self._queues[RequestClass.ONLINE], *self._queues[RequestClass.OFFLINE]]

    def _queue(self, req: Request) -> deque[Request]:
        return self._queues[req.request_class if self.policy.knows_classes else RequestClass.ONLINE]

    def add(self, request: Request) -> None:
        queue = self._queue(request)
        if request.deadline is None or queue is self._queues[RequestClass.ONLINE]:
            queue.append(request)
            return
        # Offline work with a deadline (a batch's completion window) waits in earliest-deadline-first
        # order, so a job that risks missing its window overtakes those with time to spare. Requests
        # without one keep arrival order behind them.
        i = len(queue)
        while i > 0 and (queue[i - 1].deadline is None or queue[i - 1].deadline > request.deadline):
            i -= 1
        queue.insert(i, request)

    def has_work(self) -> bool:
        return bool(self.running or any(self._queues.values()))

    def online_waiting(self) -> bool:
        return self.policy.knows_classes and bool(self._queues[RequestClass.ONLINE])

    def online_in_flight(self) -> bool:
        return self.online_waiting() or any(r.online for r in self.running)

    # ---- planning a step --------------------------------------------------------------------------

    def schedule(self, only_new_online: bool = False, busy: frozenset[str] = frozenset()) -> SchedulerOutput:
        """Plan the next step. With only_new_online (a step inserted while another is parked), admit waiting
        online requests and nothing else, and never evict a request in `busy` (the parked step's)."""
        out = SchedulerOutput()
        step = _StepPlan(out, self.config.max_num_batched_tokens)
        if only_new_online:
            self._admit(step, self._queues[RequestClass.ONLINE], busy)
            return out
        if not self.policy.knows_classes:
            self._run_running(step, self.running)
            if not out.preempted:  # a step that had to preempt is short of memory: admitting would thrash
                self._admit(step, self._queues[RequestClass.ONLINE], busy)
            return out

        online_active = self.online_in_flight()
        if self.policy.harvests and not online_active:
            step.budget = self.config.offline_max_batched_tokens or self.config.max_num_batched_tokens
        self._run_running(step, [r for r in self.running if r.online])
        if not out.preempted:
            self._admit(step, self._queues[RequestClass.ONLINE], busy)
        if self.policy.harvests and online_active:
            if any(c.request.online and c.num_tokens > 1 for c in out.chunks):
                return out  # an online prefill chunk: its first token waits on this step, add nothing
            step.limit_time(self.cost_model, self.config.slo_tpot_s * TPOT_PLANNING_SHARE / self.time_scale)
        self._run_running(step, [r for r in self.running if not r.online])
        if not out.preempted:
            self._admit(step, self._queues[RequestClass.OFFLINE], busy)
        if step.cost_model is not None and out.chunks:
            out.predicted_s = step.predicted()
        return out

    def observe(self, predicted_s: float, measured_s: float) -> None:
        """Learn from an SLO-sized step: measured_s is the time from planning it to handing out its tokens."""
        ratio = min(max(measured_s / max(predicted_s, 1e-6), TIME_SCALE_BOUNDS[0]), TIME_SCALE_BOUNDS[1])
        self.time_scale += TIME_SCALE_WEIGHT * (ratio - self.time_scale)

    def _run_running(self, step: "_StepPlan", requests: list[Request]) -> None:
        for req in requests:
            if step.budget <= 0:
                return
            if req.status is not RequestStatus.RUNNING:
                continue  # evicted earlier in this step
            n = step.chunk(req, self._chunk_size(req, req.num_computed_tokens, step.budget))
            if n == 0:
                continue
            if not self._reserve_blocks(req, req.num_computed_tokens + n, step):
                if req.status is RequestStatus.RUNNING:
                    continue
                return  # req was evicted itself: memory is short, later requests would only thrash
            step.add(req, n)

    def _admit(self, step: "_StepPlan", queue: deque[Request], busy: frozenset[str]) -> None:
        while queue and step.budget > 0:
            req = queue[0]
            offline = self.policy.knows_classes and not req.online
            harvesting = offline and self.policy.harvests
            seats = self.config.max_num_seqs - (self.config.online_reserve_seats if harvesting else 0)
            if offline and len(self.running) >= seats:
                return
            restorable = self.checkpoints.restorable(req) if self.checkpoints is not None else 0
            start = max(req.num_computed_tokens, restorable)
            n = step.chunk(req, self._chunk_size(req, start, step.budget), start)
            if n == 0:
                return
            needed = self.pool.blocks_for(start + n) - len(req.block_ids)
            reserve = self.config.online_reserve_blocks if harvesting else 0
            no_seat = len(self.running) >= self.config.max_num_seqs
            if no_seat or needed + reserve > self.pool.num_free:
                # Online requests may evict offline ones to get in, for a seat as for memory (measured
                # on an H200: offline requests held all 128 seats and online arrivals ran one at a
                # time, 3-5 s TTFT); nothing else evicts to be admitted.
                if offline or not self.policy.knows_classes or not self._evict_offline_for(needed, step, busy):
                    return
            queue.popleft()
            req.block_ids.extend(self.pool.allocate(needed))
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            if start > req.num_computed_tokens:
                self.checkpoints.restore(req, start)
                step.out.restored_tokens += start - req.num_computed_tokens
                req.num_computed_tokens = start
            step.add(req, n)

    def _chunk_size(self, req: Request, start: int, budget: int) -> int:
        remaining = req.num_tokens - start
        if remaining <= budget:
            return remaining
        # Without chunked prefill a prompt waits for a step with room for all of it (prompts longer
        # than a whole step are refused at submission). A preempted request recomputing prompt and
        # output may have outgrown a step, so it is always recomputed in chunks.
        if self.config.enable_chunked_prefill or req.num_output_tokens > 0:
            return budget
        return 0

    # ---- memory -----------------------------------------------------------------------------------

    def _reserve_blocks(self, req: Request, num_tokens: int, step: "_StepPlan") -> bool:
        """Give a running req the blocks its first num_tokens tokens need, evicting others until it fits
        (False if it cannot, or if req had to go itself).

        fcfs evicts the latest admitted: requests are visited in running order and victims come from the
        end, so a victim is never one this step already scheduled. The class-aware policies evict offline
        requests first, and an offline request never evicts an online one."""
        needed = self.pool.blocks_for(num_tokens) - len(req.block_ids)
        while needed > self.pool.num_free:
            victim = self._victim(req, step)
            if victim is None:
                return False
            if self.checkpoints is not None and not req.online:
                # Offline evicting offline: no online request waits on this, so let the victim's copies
                # in flight land first (measured: evictions right after a step otherwise lost its
                # last 512-token chunk to recompute).
                self.checkpoints.settle(victim)
            self.preempt(victim)
            step.out.preempted.append(victim)
            if victim is req:
                return False
        req.block_ids.extend(self.pool.allocate(needed))
        return True

    def _evict_offline_for(self, needed: int, step: "_StepPlan", busy: frozenset[str]) -> bool:
        """Evict offline requests until `needed` blocks are free and a running seat is (for a request
        about to be admitted); False (evicting nothing) if they cannot."""
        victims = self._offline_victims(step, busy)
        no_seat = len(self.running) >= self.config.max_num_seqs
        if (no_seat and not victims) or sum(len(r.block_ids) for r in victims) + self.pool.num_free < needed:
            return False
        while needed > self.pool.num_free or len(self.running) >= self.config.max_num_seqs:
            victim = victims.pop(0)
            self.preempt(victim)
            step.out.preempted.append(victim)
        return True

    def _victim(self, req: Request, step: "_StepPlan") -> Request | None:
        if not self.policy.knows_classes:
            return self.running[-1]
        offline = self._offline_victims(step, frozenset(), also=req)
        if offline:
            return offline[0]
        if not req.online:
            return None
        online = [r for r in self.running if r.online and (r is req or r.request_id not in step.scheduled)]
        return online[-1] if online else None

    def _offline_victims(self, step: "_StepPlan", busy: frozenset[str], also: Request | None = None) -> list[Request]:
        """Offline requests that may be evicted, best victim first: not in this step's plan or in a parked
        step. conserve evicts the one that loses the least (KV not yet checkpointed), the latest
        admitted among equals; the other policies the latest admitted."""
        order = {id(r): i for i, r in enumerate(self.running)}
        victims = [r for r in self.running if not r.online and r.request_id not in busy
                   and (r is also or r.request_id not in step.scheduled)]
        if self.policy.harvests and self.checkpoints is not None:
            victims.sort(key=lambda r: (r.num_computed_tokens - r.num_checkpointed_tokens, -order[id(r)]))
        else:
            victims.reverse()
        return victims

    def preempt(self, req: Request) -> None:
        """Free req's device blocks and put it back at the front of its queue. It resumes from its host
        checkpoint where there is one, else recomputes from scratch."""
        self.running.remove(req)
        if self.checkpoints is not None:
            self.checkpoints.on_evict(req)
        self.pool.free(req.block_ids)
        req.block_ids = []
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self._queue(req).appendleft(req)

    def finish(self, req: Request) -> None:
        """Remove a finished or aborted request from wherever it is and free its blocks."""
        if req in self.running:
            self.running.remove(req)
        else:
            queue = self._queue(req)
            if req in queue:
                queue.remove(req)
        if self.checkpoints is not None:
            # Before the blocks go: a copy the store's thread is about to plan must see the request
            # gone (on CUDA it planned slots from an emptied block table and the thread died).
            self.checkpoints.drop(req)
        self.pool.free(req.block_ids)
        req.block_ids = []
        req.status = RequestStatus.FINISHED


class _StepPlan:
    """The step being planned: its output, token budget, and (while online work is in flight under
    conserve) the predicted seconds it may take. Predictions cover the whole step, not chunk by chunk:
    the cost of a decode depends on the longest decode beside it (the runner pads decodes to it)."""

    def __init__(self, out: SchedulerOutput, budget: int):
        self.out = out
        self.budget = budget
        self.scheduled: set[str] = set()
        self.cost_model: StepCostModel | None = None
        self.seconds_limit = float("inf")
        self._shape: list[tuple[int, int]] = []

    def limit_time(self, cost_model: StepCostModel, seconds: float) -> None:
        self.cost_model = cost_model
        self.seconds_limit = seconds

    def chunk(self, req: Request, n: int, start: int | None = None) -> int:
        """n, cut to the largest chunk that keeps the predicted step time within the limit."""
        if self.cost_model is None or n == 0:
            return n
        start = req.num_computed_tokens if start is None else start

        def fits(k: int) -> bool:
            return self.cost_model.predict([*self._shape, (k, start)]) <= self.seconds_limit

        if not fits(1):
            return 0
        lo, hi = 1, n  # the cost grows with the chunk: binary search for the largest that fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        return lo

    def predicted(self) -> float:
        return self.cost_model.predict(self._shape)

    def add(self, req: Request, n: int) -> None:
        self._shape.append((n, req.num_computed_tokens))
        self.out.chunks.append(ScheduledChunk(req, n))
        self.scheduled.add(req.request_id)
        self.budget -= n
