"""Paged KV cache: one preallocated pool of fixed-size blocks per layer and the free list that hands them out."""
from __future__ import annotations

from collections import deque

import torch

from engine.errors import EngineError
from engine.model_config import ModelConfig


class OutOfBlocksError(EngineError):
    """The pool has fewer free blocks than a request asked for."""


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold num_tokens tokens."""
    return -(-num_tokens // block_size)


def slot_numbers(block_ids: list[int], block_size: int, start: int, end: int) -> list[int]:
    """Cache slots of a sequence's tokens [start, end), given its block table (plain Python: most
    spans are a token or a few)."""
    return [block_ids[p // block_size] * block_size + p % block_size for p in range(start, end)]


class BlockPool:
    """Free list of block ids. Knows nothing of tensors, so the scheduler can plan with it alone."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the KV pool needs at least one block of at least one token")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return blocks_for(num_tokens, self.block_size)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocksError(f"asked for {n} KV blocks, {len(self._free)} free")
        return [self._free.popleft() for _ in range(n)]

    def free(self, block_ids: list[int]) -> None:
        self._free.extend(block_ids)

    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks


def kv_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    per_token = 2 * config.num_key_value_heads * config.head_dim * torch.empty((), dtype=dtype).element_size()
    return per_token * block_size * config.num_hidden_layers


class KVCache:
    """Per-layer key and value tensors laid out [kv_heads, num_blocks * block_size, head_dim].

    The flat slot axis makes a write one index_copy_ by slot number and a read one index_select of
    the slots a batch of sequences owns; putting kv_heads first makes that read come out as
    [kv_heads, seqs, context, head_dim], contiguous for the batched matrix products of attention
    (a strided operand made them 6x slower on CPU).

    Every layer's tensors are views of one `slots` tensor [2 * layers (keys, then values), kv_heads,
    slots, head_dim] (each view still contiguous), so copying some tokens' KV of many layers at once,
    as checkpoints and restores do, takes one index_select (SLOT_DIM) rather than one per layer and kind."""

    SLOT_DIM = 2

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device):
        layers = config.num_hidden_layers
        self.slots = torch.zeros((2 * layers, config.num_key_value_heads, num_blocks * block_size, config.head_dim),
                                 dtype=dtype, device=device)
        self.keys = list(self.slots[:layers].unbind(0))
        self.values = list(self.slots[layers:].unbind(0))
        self.block_size = block_size
        self.num_blocks = num_blocks
        # Row offsets [kv_heads, 1] of each KV head's blocks in a layer viewed as [kv_heads * num_blocks,
        # block_size * head_dim]: block table + offset = the rows attention gathers.
        self.head_offsets = (torch.arange(config.num_key_value_heads, device=device) * num_blocks).unsqueeze(1)
