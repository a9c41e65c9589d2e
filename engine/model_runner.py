"""Turns a scheduled step into tensors (token ids, positions, cache slots), runs the model and samples."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.attention import AttentionMetadata, PrefillGroup
from engine.kv_cache import KVCache
from engine.model import LlamaModel, Safepoint
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


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache: KVCache, device: torch.device):
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        self.device = device
        self._block_offsets = torch.arange(self.block_size, device=device)

    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk], safepoint: Safepoint | None = None) -> list[tuple[Request, int]]:
        """Compute the chunks' keys and values into the cache; return the token sampled for each request
        whose chunk reached its last token. The caller advances num_computed_tokens."""
        batch = self.prepare(chunks)
        logits = self.model.forward(batch.input_ids, batch.positions, batch.meta, self.kv_cache,
                                    batch.logits_indices, safepoint)
        if not batch.sampling_requests:
            return []
        tokens = sample(logits, batch.sampling_requests)
        return list(zip(batch.sampling_requests, tokens))

    def prepare(self, chunks: list[ScheduledChunk]) -> StepBatch:
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
        for c in ordered:
            req, start = c.request, c.request.num_computed_tokens
            end = start + c.num_tokens
            input_ids.extend(req.token_ids[start:end])
            positions.extend(range(start, end))
            blocks = req.block_ids
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, end))
            if c.samples:
                logits_indices.append(len(input_ids) - 1)
                sampling.append(req)

        dev = self.device
        meta = AttentionMetadata(slot_mapping=torch.tensor(slots, device=dev))
        if decodes:
            lens = [c.request.num_computed_tokens + 1 for c in decodes]
            meta.num_decodes = len(decodes)
            meta.decode_context_len = max(lens)
            meta.decode_slots = self._context_slots([c.request for c in decodes], max(lens))
            if min(lens) != max(lens):
                lens_t = torch.tensor(lens, device=dev)
                pad = torch.arange(max(lens), device=dev).unsqueeze(0) >= lens_t.unsqueeze(1)
                bias = torch.zeros(pad.shape, device=dev).masked_fill_(pad, float("-inf"))
                meta.decode_bias = bias.view(1, len(lens), 1, -1)
        token_start = len(decodes)
        for (chunk_len, cached), members in groups.items():
            context_len = cached + chunk_len
            group = PrefillGroup(token_start, len(members), chunk_len, context_len, None, None)
            if cached:
                group.context_slots = self._context_slots([c.request for c in members], context_len)
                query_pos = torch.arange(cached, context_len, device=dev).unsqueeze(1)
                group.mask = torch.arange(context_len, device=dev).unsqueeze(0) <= query_pos
            meta.prefill_groups.append(group)
            token_start += len(members) * chunk_len

        return StepBatch(
            input_ids=torch.tensor(input_ids, device=dev),
            positions=torch.tensor(positions, device=dev),
            meta=meta,
            logits_indices=torch.tensor(logits_indices, device=dev, dtype=torch.long),
            sampling_requests=sampling,
        )

    def _context_slots(self, requests: list[Request], length: int) -> torch.Tensor:
        """Cache slots of each request's first `length` tokens, flattened request-major; rows of shorter
        requests are padded with slots of block 0, which their mask hides."""
        nblocks = -(-length // self.block_size)
        table = [r.block_ids[:nblocks] + [0] * (nblocks - len(r.block_ids[:nblocks])) for r in requests]
        table_t = torch.tensor(table, device=self.device)
        slots = (table_t.unsqueeze(2) * self.block_size + self._block_offsets).view(len(requests), -1)
        return slots[:, :length].flatten()
