"""Dequantises GGUF tensors in torch for the common llama.cpp block types, gguf-py's numpy code for the rest.

gguf-py's numpy dequantisation took 1.5 s of a 8.3 s `conserve chat` for the bundled SmolLM2 (Q4_1
and Q8_0 blocks; 1.06 and 0.45 s). The same arithmetic as whole-tensor torch ops, in the same order
of float32 operations (a product, then a sum, never fused), gives the same float32 values bit for bit
(tests/engine/test_gguf_header.py checks it against gguf-py) in a fraction of the time."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

BLOCK = 32  # elements per block in Q4_0, Q4_1 and Q8_0


def dequantize(data: np.ndarray, qtype: Any) -> torch.Tensor:
    """float32 values of a tensor's data as laid out in the file (gguf-py's byte shape for quantised
    types), shaped [..., elements per row]."""
    from gguf import GGMLQuantizationType as Q

    fast = {Q.Q4_0: _q4_0, Q.Q4_1: _q4_1, Q.Q8_0: _q8_0}.get(qtype)
    if fast is None:
        from gguf.quants import dequantize as numpy_dequantize

        values = numpy_dequantize(data, qtype)
        # Plain float32 comes back as a view of the read-only map: torch needs its own writable copy.
        return torch.from_numpy(np.array(values, dtype=np.float32))
    rows = data.shape[:-1]
    raw = torch.from_numpy(np.array(data, dtype=np.uint8))  # a copy: the map is read-only
    return fast(raw.reshape(-1, data.shape[-1])).reshape(*rows, -1)


def _blocks(raw: torch.Tensor, block_bytes: int) -> torch.Tensor:
    return raw.reshape(-1, block_bytes)


def _half(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The float16 at bytes [start, start + 2) of every block, as float32 [blocks, 1]."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """16 bytes per block -> 32 values: the low nibbles of bytes 0..15, then their high nibbles."""
    return torch.cat((packed & 0x0F, packed >> 4), dim=1).float()


def _q4_0(raw: torch.Tensor) -> torch.Tensor:
    blocks = _blocks(raw, 2 + BLOCK // 2)
    d = _half(blocks, 0)
    q = _nibbles(blocks[:, 2:]).sub_(8)
    return (d * q).reshape(raw.shape[0], -1)


def _q4_1(raw: torch.Tensor) -> torch.Tensor:
    blocks = _blocks(raw, 4 + BLOCK // 2)
    d, m = _half(blocks, 0), _half(blocks, 2)
    q = _nibbles(blocks[:, 4:])
    return (d * q).add_(m).reshape(raw.shape[0], -1)


def _q8_0(raw: torch.Tensor) -> torch.Tensor:
    blocks = _blocks(raw, 2 + BLOCK)
    d = _half(blocks, 0)
    q = blocks[:, 2:].contiguous().view(torch.int8).float()
    return (q * d).reshape(raw.shape[0], -1)
