"""Decode steps replayed from CUDA graphs, one graph per layer, so a step costs a few dozen graph
launches instead of hundreds of kernel launches.

Why: on a GPU a small model's decode step is bound by the host, not the device. On an H200 with
SmolLM2-135M a batch-64 decode step launched 335 kernels and kept the GPU busy 12% of the time
(bench/gpu_busy.py); the kernels themselves took about 1.4 ms of an 11 ms step.

How: a step whose chunks are all single tokens (decodes) is padded to a bucket of batch rows and of
context blocks, its inputs (token ids, positions, cache slots, context lengths, block tables) are
copied into static buffers in one host-to-device copy, and the bucket's graphs are replayed: a
prologue (embedding, rotary lookup, the attention's gather rows and mask), one graph per transformer
layer, and the LM head. Graphs are captured the first time a bucket is met and kept.
- One graph per layer keeps layer-wise preemption: the safepoint is asked between replays, as the
  eager forward asks it between layers. A stopped step hands back its hidden state like the eager one,
  and the runner finishes it eagerly.
- Padding rows attend to and write into a scratch block that no request owns (the KV cache holds one
  block beyond the pool's), with a context of one token, so they never touch a request's keys and
  values and never divide by an empty softmax.
- Padding the context to a power of two blocks bounds the number of buckets; masked keys add work
  on the GPU, not Python launches, which is the scarce resource here.

On the CPU the same code runs with `capture=False`: the prologue, layers and head are called as
plain functions on the static buffers. That path exists to test the padding, scratch block and
parking logic on machines without a GPU; on a CPU it is no faster than the eager step."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from engine.attention import AttentionMetadata
from engine.kv_cache import KVCache, blocks_for, slot_numbers
from engine.model import LlamaModel, Parked, Safepoint
from engine.request import Request

log = logging.getLogger(__name__)

# Batch sizes graphs are captured for; a step is padded up to the next one.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)


def batch_bucket(n: int) -> int:
    return next(b for b in BATCH_BUCKETS if b >= n)


def width_bucket(blocks: int, max_blocks: int) -> int:
    """Context blocks a step is padded to: the next power of two, at most max_blocks."""
    return min(1 << max(0, blocks - 1).bit_length(), max_blocks)


@dataclass
class DecodePlan:
    """What one graphed decode step holds: its requests in batch order and its bucket."""
    requests: list[Request]
    sampled_rows: list[int]   # rows whose logits are sampled (a decode that completes a prefill, or a real decode)
    batch: int                # padded batch rows
    width: int                # padded context blocks per row


@dataclass
class _Bucket:
    steps: list[Callable[[], object]]   # prologue, layer 0 .. L-1, head: replays (or plain calls on CPU)
    logits: torch.Tensor | None = None  # the head's output [batch, vocab], rewritten by every replay


class DecodeGraphs:
    def __init__(self, model: LlamaModel, kv_cache: KVCache, scratch_block: int, max_batch: int,
                 max_context: int, device: torch.device, capture: bool, max_gather_bytes: int = 1 << 30):
        """Graphs for up to max_batch decodes of up to max_context tokens each, whose gathered keys and
        values take at most max_gather_bytes a layer: the graphs keep that memory for their replays
        (in one pool shared by every bucket), where an eager step frees it after each layer."""
        cfg = model.config
        self.model, self.kv_cache, self.device, self.capture = model, kv_cache, device, capture
        self.block_size = bs = kv_cache.block_size
        self.scratch_block = scratch_block
        self.max_batch = batch_bucket(min(max_batch, BATCH_BUCKETS[-1]))
        self.max_blocks = blocks_for(max_context, bs)
        self.num_layers = len(model.layers)
        kvh, d = cfg.num_key_value_heads, cfg.head_dim
        b, w = self.max_batch, width_bucket(self.max_blocks, self.max_blocks)
        dtype = model.embed.dtype
        # Keys and values of one context token, as a layer's attention gathers them.
        self.max_gather_tokens = max_gather_bytes // (2 * kvh * d * kv_cache.keys[0].element_size())
        # Static buffers every graph reads a prefix of. `inputs` is filled by one copy per step:
        # ids, positions, slots, lengths ([batch] each), then the block table [batch, width].
        self.inputs = torch.zeros(4 * b + b * w, dtype=torch.long, device=device)
        self.hidden = torch.zeros(b, cfg.hidden_size, dtype=dtype, device=device)
        self.cos = torch.zeros(b, 1, d, dtype=dtype, device=device)
        self.sin = torch.zeros(b, 1, d, dtype=dtype, device=device)
        self.rows = torch.zeros(kvh * b * w, dtype=torch.long, device=device)
        self.bias = torch.zeros(b * w * bs, dtype=model.backend.bias_dtype(dtype), device=device)
        self.key_positions = torch.arange(w * bs, device=device)
        self._buckets: dict[tuple[int, int], _Bucket] = {}
        self._pool = torch.cuda.graph_pool_handle() if capture else None
        self.disabled = False  # set when a capture failed: every step then runs eagerly
        self.steps_run = 0     # steps that ran every layer through the graphs
        self.capture_seconds = 0.0

    @property
    def buckets(self) -> list[tuple[int, int]]:
        """(batch rows, context blocks) of every bucket captured so far."""
        return sorted(self._buckets)

    def plan(self, requests: list[Request], sampled_rows: list[int]) -> DecodePlan | None:
        """The bucket for a step of these decodes, or None when it is too large for the graphs (batch,
        context, or the memory its gather would keep)."""
        if self.disabled or not requests or len(requests) > self.max_batch:
            return None
        blocks = max(blocks_for(r.num_computed_tokens + 1, self.block_size) for r in requests)
        if blocks > self.max_blocks:
            return None
        plan = DecodePlan(requests, sampled_rows, batch_bucket(len(requests)), width_bucket(blocks, self.max_blocks))
        if plan.batch * plan.width * self.block_size > self.max_gather_tokens:
            return None
        return plan

    def run(self, plan: DecodePlan, safepoint: Safepoint | None) -> torch.Tensor | Parked | None:
        """Logits of the plan's sampled rows; or Parked (hidden state of its real rows) if the
        safepoint stopped it before a layer; or None, with nothing computed that an eager run of the
        step would not compute alike, when its graphs could not be captured (the caller runs it eagerly)."""
        self._fill(plan)
        key = (plan.batch, plan.width)
        bucket = self._buckets.get(key)
        if bucket is None:
            try:
                bucket = self._build(*key)
            except Exception:
                # A GPU or torch build that cannot capture these ops: serve eagerly from now on. The
                # warm-up may have written this step's keys and values; the eager run writes the same.
                log.exception("capturing decode CUDA graphs failed; decode steps run eagerly from now on")
                self.disabled = True
                return None
            self._buckets[key] = bucket
        steps = bucket.steps
        steps[0]()
        n = len(plan.requests)
        for i in range(self.num_layers):
            if safepoint is not None and safepoint(i):
                return Parked(i, self.hidden[:n].clone())
            steps[1 + i]()
        out = steps[-1]()
        logits = bucket.logits if self.capture else out
        self.steps_run += 1
        if len(plan.sampled_rows) == n:
            return logits[:n]
        return logits[torch.tensor(plan.sampled_rows, device=self.device)]

    def _fill(self, plan: DecodePlan) -> None:
        bs, b, w, n = self.block_size, plan.batch, plan.width, len(plan.requests)
        scratch_slot = self.scratch_block * bs
        ids, positions, slots, lengths, table = [0] * b, [0] * b, [scratch_slot] * b, [1] * b, []
        for row, r in enumerate(plan.requests):
            pos = r.num_computed_tokens
            ids[row], positions[row], lengths[row] = r.token_ids[pos], pos, pos + 1
            slots[row] = slot_numbers(r.block_ids, bs, pos, pos + 1)[0]
            used = r.block_ids[: blocks_for(pos + 1, bs)]
            table.extend(used)
            table.extend([self.scratch_block] * (w - len(used)))
        table.extend([self.scratch_block] * (w * (b - n)))
        host = torch.tensor(ids + positions + slots + lengths + table, dtype=torch.long)
        self.inputs[: host.numel()].copy_(host)

    def _views(self, b: int, w: int):
        ins = self.inputs
        ids, positions, slots, lengths = (ins[k * b:(k + 1) * b] for k in range(4))
        table = ins[4 * b: 4 * b + b * w]
        rows = self.rows[: self.kv_cache.head_offsets.shape[0] * b * w]
        bias = self.bias[: b * w * self.block_size]
        meta = AttentionMetadata(slot_mapping=slots, num_decodes=b, decode_blocks=rows,
                                 decode_bias=bias.view(1, b, 1, 1, w * self.block_size))
        return ids, positions, lengths, table, rows, bias, meta

    def _build(self, b: int, w: int) -> _Bucket:
        ids, positions, lengths, table, rows, bias, meta = self._views(b, w)
        model, cache, hidden, cos, sin = self.model, self.kv_cache, self.hidden[:b], self.cos[:b], self.sin[:b]
        keys = self.key_positions[: w * self.block_size]

        def prologue():
            hidden.copy_(F.embedding(ids, model.embed))
            c, s = model.rope.lookup(positions)
            cos.copy_(c)
            sin.copy_(s)
            rows.copy_((cache.head_offsets + table).flatten())
            hide = keys.unsqueeze(0) >= lengths.unsqueeze(1)
            bias.view(b, -1).copy_(torch.zeros_like(hide, dtype=bias.dtype).masked_fill_(hide, float("-inf")))

        def layer(i: int):
            return lambda: hidden.copy_(model.layer_forward(i, hidden, cos, sin, meta, cache))

        def head():
            return model.head(hidden)

        steps = [prologue] + [layer(i) for i in range(self.num_layers)] + [head]
        if not self.capture:
            return _Bucket(steps)
        return self._capture(steps)

    def _capture(self, steps: list[Callable[[], object]]) -> _Bucket:
        """Run the steps once on a side stream (lazy initialisation: cuBLAS handles and workspaces must
        not be created during a capture), then capture each into a graph sharing one memory pool. The
        warm-up computes this very step, so the keys and values it writes are the ones the replays
        write again."""
        started = time.perf_counter()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for step in steps:
                step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graphs, logits = [], None
        for step in steps:
            graph = torch.cuda.CUDAGraph()
            # thread_local: the checkpoint store's copy thread may use CUDA while this thread captures.
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                out = step()
            graphs.append(graph)
            logits = out
        seconds = time.perf_counter() - started
        self.capture_seconds += seconds
        log.info("captured decode CUDA graphs for a batch of %d rows in %.0f ms", logits.shape[0], 1e3 * seconds)
        return _Bucket([g.replay for g in graphs], logits)
