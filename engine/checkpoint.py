"""Incremental KV checkpointing (ConServe mechanism 2): after every step, the keys and values that offline
requests just computed are copied into a host-side store. Evicting an offline request then only frees its
device blocks (no copy on the critical path), and resuming it restores its KV from the store and
recomputes only the tail that had not been saved yet.

On CUDA the copies run on a background thread, on a side stream into pinned memory, overlapping the next
steps. On the CPU they run on the engine thread right after each step has handed out its tokens
(flush()): there the "device" is host memory and the engine's threads already keep every core busy, so a
copy thread only competes with them. Measured on 2 cores: an online prefill step that ran while the
background thread copied the previous offline step's KV took 197 ms against 167 ms with no checkpointing,
and 166-180 ms with the copies done between steps.

A copy that races with an eviction is thrown away: the request's kv_generation changes before its blocks
are freed, and a copy only counts if the generation it started under is still current when it ends, i.e.
it finished reading before the blocks could change hands."""
from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass

import torch

from engine.kv_cache import BlockPool, KVCache, blocks_for, slot_numbers
from engine.request import Request

log = logging.getLogger(__name__)

# Host-side copies move about this many bytes per operation: the KV of a few tokens goes across all
# layers in one gather and one scatter, a long chunk's a few layers at a time, so what one gather
# reads is still in cache when its scatter writes it. Measured on 2 cores (bench/checkpoint_copy.py,
# bf16 SmolLM2, 30 layers): one token 0.63 ms as 60 per-layer copies, 0.04 ms grouped; 64 decodes'
# tokens 3.4 -> 1.2 ms; a 2,048-token chunk 34.5 ms layer by layer, 32.7 ms grouped, 65 ms as one copy.
COPY_GROUP_BYTES = 1 << 20
SLOT_DIM = KVCache.SLOT_DIM


class HostKVStore:
    """Host memory laid out like KVCache (one `slots` tensor), with its own block pool."""

    def __init__(self, like: KVCache, num_blocks: int, pin: bool):
        rows, heads, _, head_dim = like.slots.shape
        # Zeroed (touched) now rather than torch.empty: first-touch page faults while serving cost the
        # all-offline throughput benchmark ~10% against ~5% with the store touched up front (2 cores).
        self.slots = torch.zeros((rows, heads, num_blocks * like.block_size, head_dim),
                                 dtype=like.slots.dtype, pin_memory=pin)
        self.pool = BlockPool(num_blocks, like.block_size)


@dataclass
class _Job:
    request: Request
    generation: int
    start: int
    end: int


@dataclass
class _StepJobs:
    """The copies one step asked for, done together: one gather per layer for the whole step."""
    jobs: list[_Job]
    ready: torch.cuda.Event | None  # CUDA: recorded after the step that computed the tokens


@dataclass
class CheckpointStats:
    checkpointed_tokens: int = 0   # tokens whose KV reached the store
    store_full: int = 0            # requests whose checkpoint stopped growing because the store was full


class Checkpointer:
    def __init__(self, kv_cache: KVCache, store: HostKVStore, device: torch.device):
        self.store = store
        self.block_size = kv_cache.block_size
        self.device = device
        self.stats = CheckpointStats()
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._jobs: deque[_StepJobs] = deque()
        self._busy = False
        self._closed = False
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._full: set[str] = set()
        # Every layer's keys and values, on the device and in the store: one tensor each (KVCache.slots).
        self._device_slots, self._host_slots = kv_cache.slots, store.slots
        rows, heads, _, head_dim = kv_cache.slots.shape
        self._rows, self._token_bytes = rows, heads * head_dim * kv_cache.slots.element_size()
        # Without a side stream (the CPU) the copies wait in _pending for the engine thread's flush().
        self._pending: list[_StepJobs] | None = [] if self._stream is None else None
        self._thread = None
        if self._pending is None:
            self._thread = threading.Thread(target=self._run, name="conserve-checkpoint", daemon=True)
            self._thread.start()

    # ---- called on the engine thread ------------------------------------------------------------

    def save(self, spans: list[tuple[Request, int, int]]) -> None:
        """Queue the copies of tokens [start, end) of each request, just computed by one step."""
        if not spans:
            return
        ready = None
        if self._stream is not None:
            ready = torch.cuda.Event()
            ready.record()
        step = _StepJobs([_Job(r, r.kv_generation, a, b) for r, a, b in spans], ready)
        if self._pending is not None:
            self._pending.append(step)
            return
        with self._work:
            self._jobs.append(step)
            self._work.notify()

    def flush(self) -> None:
        """Do the copies save() left for the engine thread (on the CPU); nothing where a thread does them."""
        if not self._pending:
            return
        for step in self._pending:
            self._process(step)
        with self._work:
            self._pending.clear()
            self._work.notify_all()

    def on_evict(self, req: Request) -> None:
        """req's device blocks are about to be freed: copies still reading them must not count."""
        with self._lock:
            req.kv_generation += 1

    def settle(self, req: Request, timeout: float = 0.05) -> None:
        """Wait (briefly) for req's queued copies, before an eviction no online request is waiting on:
        a copy of a few milliseconds is cheaper than recomputing the chunk it holds."""
        with self._work:
            self._work.wait_for(lambda: req.num_checkpointed_tokens >= req.num_computed_tokens
                                or not (self._jobs or self._busy or self._pending), timeout)

    def restorable(self, req: Request) -> int:
        """Tokens of req a restore would bring back; at least one token is always left to compute, so the
        step that resumes req samples its next token."""
        with self._lock:
            return min(req.num_checkpointed_tokens, req.num_tokens - 1)

    def restore(self, req: Request, num_tokens: int) -> None:
        """Copy req's first num_tokens tokens from the store into its (new) device blocks."""
        if num_tokens <= 0:
            return
        dev = torch.tensor(slot_numbers(req.block_ids, self.block_size, 0, num_tokens), device=self.device)
        host = torch.tensor(slot_numbers(req.host_block_ids, self.block_size, 0, num_tokens))
        for rows in self._groups(num_tokens):
            saved = self._host_slots[rows].index_select(SLOT_DIM, host)
            self._device_slots[rows].index_copy_(SLOT_DIM, dev, saved.to(self.device))

    def drop(self, req: Request) -> None:
        """req is finished: give its host blocks back."""
        with self._lock:
            req.kv_generation += 1
            self.store.pool.free(req.host_block_ids)
            req.host_block_ids = []
            req.num_checkpointed_tokens = 0
            self._full.discard(req.request_id)

    def usage(self) -> float:
        with self._lock:
            return self.store.pool.usage()

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Block until every queued copy is done (tests and benchmarks; the engine never waits)."""
        with self._work:
            return self._work.wait_for(lambda: not (self._jobs or self._busy or self._pending), timeout)

    def close(self) -> None:
        with self._work:
            self._closed = True
            self._work.notify_all()
        if self._thread is not None:
            self._thread.join()

    # ---- the copy thread ------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._work:
                self._busy = False
                self._work.notify_all()
                self._work.wait_for(lambda: self._jobs or self._closed)
                if self._closed:
                    return
                step = self._jobs.popleft()
                self._busy = True
            self._process(step)

    def _process(self, step: _StepJobs) -> None:
        with self._lock:
            planned = [(job, plan) for job in step.jobs if (plan := self._plan(job)) is not None]
        if not planned:
            return
        try:
            self._copy([slot for _, (dev, _) in planned for slot in dev],
                       [slot for _, (_, host) in planned for slot in host], step.ready)
        except Exception:  # a failed copy only loses checkpoints: those requests will recompute instead
            log.exception("KV checkpoint copy failed")
            return
        with self._lock:
            for job, _ in planned:
                req = job.request
                if req.kv_generation == job.generation and req.num_checkpointed_tokens == job.start:
                    req.num_checkpointed_tokens = job.end
                    self.stats.checkpointed_tokens += job.end - job.start

    def _plan(self, job: _Job) -> tuple[list[int], list[int]] | None:
        """Under the lock: host blocks for the job and the slots to copy, or None to skip it."""
        req = job.request
        # Stale (evicted or finished since), or a gap before it (an earlier copy was skipped): the
        # checkpoint only ever holds a prefix of the request.
        if req.kv_generation != job.generation or req.num_checkpointed_tokens != job.start:
            return None
        needed = blocks_for(job.end, self.block_size) - len(req.host_block_ids)
        if needed > self.store.pool.num_free:
            if req.request_id not in self._full:
                self._full.add(req.request_id)
                self.stats.store_full += 1
            return None
        req.host_block_ids.extend(self.store.pool.allocate(max(0, needed)))
        return (slot_numbers(req.block_ids, self.block_size, job.start, job.end),
                slot_numbers(req.host_block_ids, self.block_size, job.start, job.end))

    def _groups(self, num_tokens: int) -> list[slice]:
        """Slices of the slots tensors' first axis (layers and kinds) to copy num_tokens tokens in."""
        step = max(1, COPY_GROUP_BYTES // (num_tokens * self._token_bytes))
        return [slice(a, a + step) for a in range(0, self._rows, step)]

    def _copy(self, dev_slots: list[int], host_slots: list[int], ready: torch.cuda.Event | None) -> None:
        """Gather the tokens' KV on the device, scatter it into the store. On CUDA the gather is one
        operation across every layer on the side stream (after the step that wrote the tokens), and lands
        in pinned memory, so its copy to the host is an asynchronous DMA (a copy into pageable memory
        blocks)."""
        host_idx = torch.tensor(host_slots)
        groups = self._groups(len(host_slots))
        if self._stream is None:
            dev_idx = torch.tensor(dev_slots)
            for rows in groups:
                self._host_slots[rows].index_copy_(SLOT_DIM, host_idx,
                                                   self._device_slots[rows].index_select(SLOT_DIM, dev_idx))
            return
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(ready)
            dev_idx = torch.tensor(dev_slots, pin_memory=True).to(self.device, non_blocking=True)
            gathered = self._device_slots.index_select(SLOT_DIM, dev_idx)
            staged = torch.empty(gathered.shape, dtype=gathered.dtype, pin_memory=True)
            staged.copy_(gathered, non_blocking=True)
            self._stream.synchronize()
        for rows in groups:
            self._host_slots[rows].index_copy_(SLOT_DIM, host_idx, staged[rows])

