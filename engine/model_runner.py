"""Turns a scheduled step into tensors (token ids, positions, cache slots), runs the model and samples."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.attention import AttentionMetadata, PrefillGroup
from engine.decode_graphs import DecodeGraphs
from engine.decode_mirror import DecodeMirror
from engine.kv_cache import KVCache, blocks_for, slot_numbers
from engine.model import LlamaModel, Parked, Safepoint
from engine.request import Request
from engine.sampler import sample
from engine.scheduler import ScheduledChunk


@dataclass
class StepBatch:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logits_indices: torch.Tensor
    sampling_requests: list[Request]
    # Each chunk with the batch row its tokens start at (prepare() reorders chunks: decodes first).
    chunk_rows: list[tuple[ScheduledChunk, int]]
    # The decodes' requests and context lengths (after the step), to fall back from the mirror to the gather.
    decode_requests: list[Request]
    decode_lengths: list[int]
    mirror_table: list | None = None  # what the decode mirror holds once this step has run every layer


@dataclass
class ParkedStep:
    """A step stopped at a safepoint (layer-wise preemption), kept to be finished later."""
    chunks: list[ScheduledChunk]
    # None for a step stopped in the decode graphs: its hidden rows are in the chunks' order, and the
    # eager batch that finishes it is built only if it is resumed or shed.
    batch: StepBatch | None
    state: Parked

    @property
    def requests(self) -> set[str]:
        return {c.request.request_id for c in self.chunks}


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache: KVCache, device: torch.device,
                 mirror: DecodeMirror | None = None, graphs: DecodeGraphs | None = None):
        if mirror is not None and graphs is not None:
            # A graphed step writes the pool only, which would leave the mirror a token behind.
            raise ValueError("the decode mirror and decode graphs exclude each other")
        self.model = model
        self.mirror = mirror
        self.graphs = graphs
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        self.device = device
        self._bias_dtype = model.backend.bias_dtype(kv_cache.keys[0].dtype)
        self._native_decode = model.backend.native_decode(device, kv_cache.keys[0].dtype)
        if mirror is not None and self._native_decode:
            raise ValueError("the native decode kernel reads the pool; a decode mirror would only cost memory")

    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk],
                safepoint: Safepoint | None = None) -> list[tuple[Request, int]] | ParkedStep:
        """Compute the chunks' keys and values into the cache; return the token sampled for each request
        whose chunk reached its last token. The caller advances num_computed_tokens.
        If `safepoint` stops the step between layers, return it parked instead (nothing is sampled)."""
        if self.graphs is not None and chunks and all(c.num_tokens == 1 for c in chunks):
            result = self._run_graphed(chunks, safepoint)
            if result is not None:
                return result
        return self._run(chunks, self.prepare(chunks), safepoint, None)

    def _run_graphed(self, chunks: list[ScheduledChunk], safepoint: Safepoint | None):
        """A step of single-token chunks through the decode graphs; None if they cannot take it."""
        requests = [c.request for c in chunks]
        sampled = [i for i, c in enumerate(chunks) if c.samples]
        plan = self.graphs.plan(requests, sampled)
        logits = self.graphs.run(plan, safepoint) if plan is not None else None
        if logits is None:
            return None
        if isinstance(logits, Parked):  # finished (or shed) eagerly, if at all, from the layer it stopped at
            return ParkedStep(chunks, None, logits)
        if not sampled:
            return []
        sampling = [requests[i] for i in sampled]
        return list(zip(sampling, sample(logits, sampling)))

    @torch.inference_mode()
    def shed(self, parked: ParkedStep, keep: list[ScheduledChunk]) -> list[tuple[Request, int]]:
        """Finish a parked step for `keep` (some of its chunks) alone, from the layer it stopped at: their
        hidden rows go on through the remaining layers, the other chunks' rows are dropped (nothing of
        theirs was committed; their requests run again)."""
        # No mirror: the parked step left the mirror's layers unequal, and this one runs only the rest.
        batch = self.prepare(keep, use_mirror=False)
        old_start = ({id(c): row for c, row in parked.batch.chunk_rows} if parked.batch is not None
                     else {id(c): row for row, c in enumerate(parked.chunks)})
        rows = [old_start[id(c)] + j for c, _ in batch.chunk_rows for j in range(c.num_tokens)]
        hidden = parked.state.hidden.index_select(0, torch.tensor(rows, device=self.device))
        return self._run(keep, batch, None, Parked(parked.state.layer, hidden))

    @torch.inference_mode()
    def resume(self, parked: ParkedStep,
               safepoint: Safepoint | None = None) -> list[tuple[Request, int]] | ParkedStep:
        """Finish a parked step from the layer it stopped at (it may stop again at a later layer)."""
        batch = parked.batch if parked.batch is not None else self.prepare(parked.chunks, use_mirror=False)
        return self._run(parked.chunks, batch, safepoint, parked.state)

    def _run(self, chunks, batch: StepBatch, safepoint, resume: Parked | None):
        try:
            logits = self.model.forward(batch.input_ids, batch.positions, batch.meta, self.kv_cache,
                                        batch.logits_indices, safepoint, resume)
        except BaseException:
            if batch.meta.mirror is not None:
                self.mirror.invalidate()
            raise
        if isinstance(logits, Parked):
            if batch.meta.mirror is not None:
                # Its layers before the stop wrote the mirror, the rest did not: forget it, and let the
                # parked step finish by gathering from the pool.
                self.mirror.invalidate()
                batch.meta.mirror = None
                self._gather_decodes(batch.meta, batch.decode_requests, batch.decode_lengths)
            return ParkedStep(chunks, batch, logits)
        if batch.meta.mirror is not None:
            self.mirror.commit(batch.mirror_table)
        if not batch.sampling_requests:
            return []
        tokens = sample(logits, batch.sampling_requests)
        return list(zip(batch.sampling_requests, tokens))

    def prepare(self, chunks: list[ScheduledChunk], use_mirror: bool = True) -> StepBatch:
        decodes = [c for c in chunks if c.num_tokens == 1]
        groups: dict[tuple[int, int], list[ScheduledChunk]] = {}
        for c in chunks:
            if c.num_tokens > 1:
                groups.setdefault((c.num_tokens, c.request.num_computed_tokens), []).append(c)
        ordered = decodes + [c for group in groups.values() for c in group]

        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_indices: list[int] = []
        sampling: list[Request] = []
        chunk_rows: list[tuple[ScheduledChunk, int]] = []
        for c in ordered:
            chunk_rows.append((c, len(input_ids)))
            req, start = c.request, c.request.num_computed_tokens
            end = start + c.num_tokens
            input_ids.extend(req.token_ids[start:end])
            positions.extend(range(start, end))
            blocks = req.block_ids
            slots.extend(slot_numbers(blocks, bs, start, end))
            if c.samples:
                logits_indices.append(len(input_ids) - 1)
                sampling.append(req)

        dev = self.device
        meta = AttentionMetadata(slot_mapping=torch.tensor(slots, device=dev))
        decode_requests = [c.request for c in decodes]
        decode_lengths = [r.num_computed_tokens + 1 for r in decode_requests]
        mirror_table = None
        if decodes:
            meta.num_decodes = len(decodes)
            if use_mirror and self.mirror is not None:
                meta.mirror, mirror_table = self.mirror.plan(
                    decode_requests, decode_lengths, self._block_tables, self._bias)
            if meta.mirror is None:
                self._gather_decodes(meta, decode_requests, decode_lengths)
        token_start = len(decodes)
        for (chunk_len, cached), members in groups.items():
            context_len = cached + chunk_len
            blocks, keys = (self._block_tables([c.request for c in members], [context_len] * len(members))
                            if cached else (None, chunk_len))
            query_pos = torch.arange(cached, context_len, device=dev).unsqueeze(1)
            hidden = torch.arange(keys, device=dev).unsqueeze(0) > query_pos  # later tokens and padding
            meta.prefill_groups.append(
                PrefillGroup(token_start, len(members), chunk_len, blocks, self._bias(hidden)))
            token_start += len(members) * chunk_len

        return StepBatch(
            input_ids=torch.tensor(input_ids, device=dev),
            positions=torch.tensor(positions, device=dev),
            meta=meta,
            logits_indices=torch.tensor(logits_indices, device=dev, dtype=torch.long),
            sampling_requests=sampling,
            chunk_rows=chunk_rows,
            decode_requests=decode_requests,
            decode_lengths=decode_lengths,
            mirror_table=mirror_table,
        )

    def _gather_decodes(self, meta: AttentionMetadata, requests: list[Request], lengths: list[int]) -> None:
        """Decodes attend over their blocks gathered from the pool (decode_blocks, decode_bias), or read
        them in place with the native kernel (decode_tables, decode_lens)."""
        if self._native_decode:
            meta.decode_tables = torch.tensor(self._padded_block_ids(requests, lengths), dtype=torch.int32)
            meta.decode_lens = torch.tensor(lengths, dtype=torch.int32)
            return
        meta.decode_blocks, keys = self._block_tables(requests, lengths)
        hidden = torch.arange(keys, device=self.device).unsqueeze(0) >= torch.tensor(lengths, device=self.device).unsqueeze(1)
        meta.decode_bias = self._bias(hidden).view(1, len(requests), 1, 1, keys)

    def _block_tables(self, requests: list[Request], context_lens: list[int]) -> tuple[torch.Tensor, int]:
        """Cache rows to gather (AttentionMetadata.decode_blocks) for each request's first context_lens
        tokens, padded to the longest with block 0 (hidden by the bias); and the key positions covered."""
        tables = self._padded_block_ids(requests, context_lens)
        flat = torch.tensor([b for t in tables for b in t], device=self.device)
        return (self.kv_cache.head_offsets + flat).flatten(), len(tables[0]) * self.block_size

    def _padded_block_ids(self, requests: list[Request], context_lens: list[int]) -> list[list[int]]:
        """Each request's blocks holding its first context_lens tokens, padded with block 0 to the longest."""
        tables = [r.block_ids[: blocks_for(n, self.block_size)] for r, n in zip(requests, context_lens)]
        width = max(len(t) for t in tables)
        return [t + [0] * (width - len(t)) for t in tables]

    def _bias(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.zeros(hidden.shape, dtype=self._bias_dtype, device=self.device).masked_fill_(hidden, float("-inf"))
