"""The PyTorch attention backend against a naive per-sequence reference on a paged cache."""
from __future__ import annotations

import pytest
import torch

from engine.attention import TorchAttentionBackend, cpu_sdpa_decode_dtypes, cpu_sdpa_prefill_dtypes
from engine.kv_cache import BlockPool, KVCache
from engine.model_config import ModelConfig
from engine.model_runner import ModelRunner
from engine.request import Request, RequestClass
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledChunk

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 4, 2, 8, 4
CONFIG = ModelConfig(vocab_size=64, hidden_size=HEADS * HEAD_DIM, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM)


class _NoModel:
    """ModelRunner.prepare needs no model; only the cache geometry and the backend's mask dtype."""
    backend = TorchAttentionBackend(HEADS, KV_HEADS, HEAD_DIM, BLOCK)


def reference_attention(q, keys, values, first_pos):
    """q [t, heads, d] at positions first_pos.., keys/values [L, kv_heads, d]: causal softmax attention."""
    group = HEADS // KV_HEADS
    k = keys.repeat_interleave(group, dim=1).transpose(0, 1)   # [heads, L, d]
    v = values.repeat_interleave(group, dim=1).transpose(0, 1)
    scores = q.transpose(0, 1) @ k.transpose(1, 2) / HEAD_DIM ** 0.5   # [heads, t, L]
    pos = torch.arange(first_pos, first_pos + q.shape[0]).unsqueeze(1)
    scores = scores.masked_fill(torch.arange(keys.shape[0]).unsqueeze(0) > pos, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(0, 1).reshape(q.shape[0], HEADS * HEAD_DIM)


def make_request(i: int, length: int, cached: int, pool: BlockPool) -> Request:
    req = Request(f"r{i}", list(range(length)), SamplingParams(max_tokens=4), RequestClass.ONLINE,
                  frozenset(), 1024)
    req.block_ids = pool.allocate(pool.blocks_for(length))
    pool.free(pool.allocate(1))  # interleave a freed block so tables are not contiguous
    req.num_computed_tokens = cached
    return req


@pytest.mark.parametrize("max_score_bytes, sdpa_min_chunk, sdpa_prefill_dtypes, dtype", [
    (64 << 20, 1 << 20, (), torch.float32),  # continued prefill chunks on the matmul path
    (256, 1 << 20, (), torch.float32),       # tiny score budget: query slicing
    (64 << 20, 2, (), torch.float32),        # the fresh prefill on scaled_dot_product_attention (is_causal)
    (64 << 20, 1 << 20, (torch.float32,), torch.float32),  # every prefill chunk on it, continued ones masked
    (64 << 20, 1 << 20, (), torch.bfloat16),                # bfloat16 on the matmuls (CPUs without AMX)
    (64 << 20, 1 << 20, (torch.bfloat16,), torch.bfloat16),  # bfloat16 all on the kernel (CPUs with AMX)
])
def test_paged_attention_matches_reference_for_mixed_batch(max_score_bytes, sdpa_min_chunk, sdpa_prefill_dtypes,
                                                           dtype, monkeypatch):
    """Against a float32 reference on the same (rounded) inputs: exactly in float32, to bfloat16's
    rounding of the output (8 bits of mantissa, plus the rounded probabilities) in bfloat16."""
    torch.manual_seed(0)
    monkeypatch.setattr(TorchAttentionBackend, "max_score_bytes", max_score_bytes)
    monkeypatch.setattr(TorchAttentionBackend, "sdpa_min_chunk", sdpa_min_chunk)
    monkeypatch.setattr(TorchAttentionBackend, "sdpa_prefill_dtypes", sdpa_prefill_dtypes)
    pool = BlockPool(64, BLOCK)
    cache = KVCache(CONFIG, 64, BLOCK, dtype, torch.device("cpu"))
    # (total tokens, tokens already cached, tokens this step): decodes of different context lengths,
    # a fresh prefill, two prefill chunks continuing a cached prefix (same shape: batched together).
    shapes = [(7, 6, 1), (13, 12, 1), (1, 0, 1), (9, 0, 9), (11, 5, 6), (11, 5, 6)]
    requests = [make_request(i, total, cached, pool) for i, (total, cached, _) in enumerate(shapes)]

    def randn(*shape):  # values the dtype holds exactly, so the float32 reference sees the same inputs
        return torch.randn(*shape).to(dtype).float()

    full_k = [randn(total, KV_HEADS, HEAD_DIM) for total, _, _ in shapes]
    full_v = [randn(total, KV_HEADS, HEAD_DIM) for total, _, _ in shapes]
    for req, k, v, (_, cached, _) in zip(requests, full_k, full_v, shapes):  # earlier tokens already cached
        for p in range(cached):
            slot = req.block_ids[p // BLOCK] * BLOCK + p % BLOCK
            cache.keys[0][:, slot] = k[p]
            cache.values[0][:, slot] = v[p]

    runner = ModelRunner(_NoModel(), cache, torch.device("cpu"))
    chunks = [ScheduledChunk(r, n) for r, (_, _, n) in zip(requests, shapes)]
    batch = runner.prepare(chunks)
    order = batch.positions.tolist()
    # Rebuild the batch's q, k, v in the order prepare() laid the tokens out.
    q_all = {id(r): randn(total, HEADS, HEAD_DIM) for r, (total, _, _) in zip(requests, shapes)}
    token_owner = []
    for c in sorted(chunks, key=lambda c: c.num_tokens != 1):  # decodes first, as prepare orders them
        token_owner += [(c.request, c.request.num_computed_tokens + j) for j in range(c.num_tokens)]
    assert [p for _, p in token_owner] == order
    index = {id(r): i for i, r in enumerate(requests)}
    q = torch.stack([q_all[id(r)][p] for r, p in token_owner])
    k = torch.stack([full_k[index[id(r)]][p] for r, p in token_owner])
    v = torch.stack([full_v[index[id(r)]][p] for r, p in token_owner])

    backend = TorchAttentionBackend(HEADS, KV_HEADS, HEAD_DIM, BLOCK)
    out = backend.forward(q.to(dtype), k.to(dtype), v.to(dtype), cache.keys[0], cache.values[0], batch.meta, 0)
    assert out.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2

    for row, (req, pos) in enumerate(token_owner):
        i = index[id(req)]
        expected = reference_attention(q_all[id(req)][pos:pos + 1], full_k[i][:pos + 1], full_v[i][:pos + 1], pos)
        torch.testing.assert_close(out[row:row + 1].float(), expected, rtol=tolerance, atol=tolerance)


def test_bfloat16_takes_the_flash_kernel_only_where_the_cpu_has_amx(monkeypatch):
    cpu = torch.device("cpu")
    kernels = {}
    for amx in (True, False):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
        assert cpu_sdpa_prefill_dtypes() == ((torch.float32, torch.bfloat16) if amx else (torch.float32,))
        assert cpu_sdpa_decode_dtypes() == ((torch.bfloat16,) if amx else ())
        monkeypatch.setattr(TorchAttentionBackend, "sdpa_prefill_dtypes", cpu_sdpa_prefill_dtypes())
        monkeypatch.setattr(TorchAttentionBackend, "sdpa_decode_dtypes", cpu_sdpa_decode_dtypes())
        backend = TorchAttentionBackend(HEADS, KV_HEADS, HEAD_DIM, BLOCK)
        kernels[amx] = {dtype: backend.kernels(cpu, dtype) for dtype in (torch.float32, torch.bfloat16)}
    # The kernels are part of a profile's cache key: a profile timed with other ones does not load.
    assert kernels[True][torch.bfloat16] != kernels[False][torch.bfloat16]
    assert kernels[True][torch.float32] == kernels[False][torch.float32]


def test_masks_stay_in_bfloat16_only_where_that_changes_no_score():
    """With head_dim 64 the scale (1/8) is exact in any dtype, so bfloat16 scores masked by a bfloat16 bias
    give bit for bit what a float32 bias gives; other head sizes keep the float32 mask."""
    assert TorchAttentionBackend(9, 3, 64, 16).bias_dtype(torch.bfloat16) == torch.bfloat16
    assert TorchAttentionBackend(32, 8, 128, 16).bias_dtype(torch.bfloat16) == torch.float32
    assert TorchAttentionBackend(9, 3, 64, 16).bias_dtype(torch.float32) == torch.float32
    torch.manual_seed(0)
    backend = TorchAttentionBackend(9, 3, 64, 16)
    n, t, context = 3, 5, 48
    q = torch.randn(n * t, 9, 64).mul(3).to(torch.bfloat16)
    keys, values = (torch.randn(3, n, context, 64).to(torch.bfloat16) for _ in range(2))
    hidden = torch.arange(context).unsqueeze(0) > torch.arange(40, 40 + t).unsqueeze(1)
    mask32 = torch.zeros(t, context).masked_fill_(hidden, float("-inf"))
    exact = backend._attend(q, n, t, keys, values, mask32.to(torch.bfloat16))
    assert torch.equal(exact, backend._attend(q, n, t, keys, values, mask32))
