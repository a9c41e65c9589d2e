"""Attention over the paged KV cache: the backend interface, the metadata a step hands it, and the PyTorch backend."""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from engine.config import cpu_has_amx
from engine.decode_mirror import MirrorPlan
from engine.native_kernels import PagedDecodeAttention


@dataclass
class PrefillGroup:
    """Sequences in one step that share a chunk length and a number of already-cached tokens.

    Their tokens sit next to each other in the batch, so one batched attention call serves them all."""
    token_start: int
    num_seqs: int
    chunk_len: int
    # Rows to gather for the sequences' context (see AttentionMetadata.decode_blocks), or None when
    # the chunk is the whole context so far: then the chunk's own keys and values are used directly.
    context_blocks: torch.Tensor | None
    # [chunk_len, keys], in the backend's bias_dtype: 0 where a query may look, -inf where it may not
    # (later positions, and the padding of the last gathered block).
    bias: torch.Tensor


@dataclass
class AttentionMetadata:
    """Everything attention needs for one step; built once per step, read by every layer.

    The batch holds the single-token (decode) sequences first, then the prefill groups."""
    slot_mapping: torch.Tensor
    num_decodes: int = 0
    # Block tables of the decodes, padded to the same width, as row numbers of a layer's cache viewed as
    # [kv_heads * num_blocks, block_size * d], head-major: [kv_heads * num_decodes * blocks].
    decode_blocks: torch.Tensor | None = None
    decode_bias: torch.Tensor | None = None    # [1, num_decodes, 1, 1, blocks * block_size]: -inf on padding
    # Set when the decodes read their context from the decode mirror (engine/decode_mirror.py) instead of
    # gathering it by decode_blocks (then None).
    mirror: MirrorPlan | None = None
    # Set instead of all of the above when the decodes attend with the native paged kernel
    # (engine/native_kernels.py), which reads the pool itself: int32 [num_decodes, width] block numbers
    # (padded with block 0, never read) and int32 [num_decodes] context lengths.
    decode_tables: torch.Tensor | None = None
    decode_lens: torch.Tensor | None = None
    prefill_groups: list[PrefillGroup] = field(default_factory=list)


class AttentionBackend(ABC):
    """Writes a layer's new keys/values into the cache and attends over each sequence's cached context."""

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_cache: torch.Tensor,
                value_cache: torch.Tensor, meta: AttentionMetadata, layer: int) -> torch.Tensor:
        """q [N, heads, d], k and v [N, kv_heads, d]; caches [kv_heads, slots, d] of layer `layer` ->
        output [N, heads * d]."""

    def bias_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype the step's masks (AttentionMetadata's biases) are built in, for a model in `dtype`."""
        return torch.float32

    def kernels(self, device: torch.device, dtype: torch.dtype) -> str:
        """Which kernels serve which steps on `device` in `dtype`: part of what a step-latency profile
        depends on (a profile taken with other kernels mispredicts)."""
        return type(self).__name__

    def mirror_cut_views(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether decodes over the decode mirror read its keys and values cut to the batch's longest
        context (DecodeMirror's cut_views) rather than over its whole capacity."""
        return False

    def native_decode(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether decodes on `device` in `dtype` attend with a kernel that reads the pool through block
        tables (AttentionMetadata.decode_tables), which needs neither the decode mirror nor a gather."""
        return False


def cpu_sdpa_prefill_dtypes() -> tuple[torch.dtype, ...]:
    """The dtypes whose prefill chunks on this CPU are faster in scaled_dot_product_attention's flash
    kernel than in the batched matmuls: float32 everywhere, bfloat16 too where the CPU has AMX.

    The kernel never writes out the scores, which the matmuls do in float32 at twice bfloat16's bytes.
    - float32, one layer at a time on 2 cores (AVX2 EPYC, SmolLM2's heads), kernel against matmuls: a
      1,000-token first chunk 24 against 93 ms, 1,024 tokens over 1,024 cached 54 against 174, 512
      over 1,000 30 against 70, 16 prompts of 128 7.7 against 15, 32 tokens over 1,000 1.0 against
      1.4, 8 over 200 0.10 against 0.21.
    - bfloat16 with AMX (2-core Xeon, torch 2.13, whole SmolLM2 steps), where the kernel's bfloat16
      products can use AMX, every step shape measured was faster with it: one 512-token first chunk 144
      against 161 ms, 1,024 tokens 273 against 401, 512 over 1,024 cached 214 against 263, 16 prompts
      of 128 379-382 against 403-414, an online decode beside 128 offline tokens over 1,024 cached
      75-79 against 84-86, beside 8 over 1,024 33.6 against 34.4.
    - bfloat16 without AMX (2-core Zen 4, AVX-512 BF16) the matmuls won: 512 new tokens over 1,000
      cached 0.59 against 0.82 s a step, 2,048 over 2,048 4.2 against 5.5 s; there bfloat16 first
      chunks take the kernel only from sdpa_min_chunk tokens."""
    return (torch.float32, torch.bfloat16) if cpu_has_amx() else (torch.float32,)


def cpu_sdpa_decode_dtypes() -> tuple[torch.dtype, ...]:
    """The dtypes whose decodes on this CPU attend over the decode mirror with scaled_dot_product_attention
    rather than the batched matmuls: bfloat16 where the CPU has AMX. Measured on a 2-core Xeon (SmolLM2,
    64 sequences decoding 128 tokens from 128, builds alternating four times each): a decode step's
    median 66.5-68.6 against 70.5-71.2 ms, the 128 steps 8.7-9.0 against 9.2-9.7 s. Elsewhere the
    matmuls stay: on CPUs without AMX they measured 2-3x faster than the kernel for few query rows, and
    float32 decodes on the kernel lost whole runs on an AVX2 EPYC (throughput.py's workload, engine
    alone, alternating: 145-147 against 159-163 tok/s)."""
    return (torch.bfloat16,) if cpu_has_amx() else ()


def cpu_matmul_cut_view_dtypes() -> tuple[torch.dtype, ...]:
    """The dtypes whose decodes on the batched matmuls read the decode mirror cut to the step's longest
    context (DecodeMirror's cut_views): float32, whose batched products (MKL's strided batches) take the
    cut views in place. Measured on a 2-core AVX2 EPYC, 64 slots x 3 KV heads, 200 of 224 positions:
    the scores' product 0.63 against 0.74 ms over all 224, the output's 0.57 against 0.60 ms (a
    contiguous copy of the cut keys first: 1.21 ms). bfloat16 keeps the whole capacity: there the cut
    scores' product measured 3.9x slower (on a CPU with AVX-512 BF16, where bfloat16 products go to
    oneDNN)."""
    return (torch.float32,)


class TorchAttentionBackend(AttentionBackend):
    """Gathers each sequence's context block by block (by its block table), then attends with batched
    matrix products. Correct on every device PyTorch runs on; a fused paged kernel can replace it on CUDA.

    Decodes and short prefill chunks use batched matmuls laid out kv-head-major, [kv_heads, seqs,
    rows, d], with the `group` query heads that share a KV head folded into the rows: no KV head is
    ever repeated, and gathered context is used as it comes out of the cache. On CPUs without AMX these
    measured 2-3x faster than scaled_dot_product_attention, whose flash kernel is slow for few query
    rows there; with AMX bfloat16 decodes over the decode mirror take the kernel (sdpa_decode_dtypes).
    Long first chunks (no cached context) go to scaled_dot_product_attention, whose causal flash
    kernel skips the masked half; on the CPU every prefill chunk does in float32, and in bfloat16 where
    the CPU has AMX (sdpa_prefill_dtypes)."""

    # Largest float32 score tensor built at once; longer prefill chunks are attended in query slices.
    max_score_bytes = 64 << 20
    # First chunks this long go to scaled_dot_product_attention with is_causal (in a dtype not in
    # sdpa_prefill_dtypes, where all do). Measured as whole steps on 2 cores (Zen 4, SmolLM2, bf16):
    # one 2,048-token prompt 2.53 s against 2.67 s with the matmuls, but 1,024 tokens 1.01 s against
    # 0.98 s and 512 tokens 0.47 s against 0.40 s. Chunks with cached context take the matmuls there:
    # the kernel has to apply an explicit mask, and measured slower at every size (512 new tokens over
    # 1,000 cached: 0.82 s against 0.59 s; 2,048 over 2,048: 5.5 s against 4.2 s).
    sdpa_min_chunk = 1536
    # Dtypes whose prefill chunks on the CPU all go to scaled_dot_product_attention, whatever their length:
    # first chunks with is_causal, chunks over cached context with the step's mask (see
    # cpu_sdpa_prefill_dtypes for which, and the measurements behind it).
    sdpa_prefill_dtypes: tuple[torch.dtype, ...] = cpu_sdpa_prefill_dtypes()
    # Dtypes whose decodes over the decode mirror take it too (cpu_sdpa_decode_dtypes).
    sdpa_decode_dtypes: tuple[torch.dtype, ...] = cpu_sdpa_decode_dtypes()
    # Dtypes whose decodes on the matmuls read the mirror cut to the longest context (cpu_matmul_cut_view_dtypes).
    matmul_cut_view_dtypes: tuple[torch.dtype, ...] = cpu_matmul_cut_view_dtypes()

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                 native: PagedDecodeAttention | None = None):
        self.num_heads = num_heads
        # The compiled paged decode kernel, used for CPU decodes in the dtypes it has (native_decode).
        self.native = native
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.group = num_heads // num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5
        # Scores may stay in the model's dtype through scaling and masking when the scale is a power of two
        # (head_dim 64: 1/8), which no dtype rounds; otherwise a float32 mask widens them first.
        self._exact_scale = math.frexp(self.scale)[0] == 0.5

    def bias_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return dtype if self._exact_scale else torch.float32

    def kernels(self, device: torch.device, dtype: torch.dtype) -> str:
        cpu = device.type == "cpu"
        prefill = ("sdpa" if cpu and dtype in self.sdpa_prefill_dtypes
                   else f"sdpa from {self.sdpa_min_chunk} new tokens, matmuls below")
        if self.native_decode(device, dtype):
            return f"prefill: {prefill}; decode: native paged kernel"
        decode = "sdpa" if cpu and dtype in self.sdpa_decode_dtypes else "matmuls"
        if self.mirror_cut_views(device, dtype):
            decode += ", cut to the longest context"
        return f"prefill: {prefill}; decode over the mirror: {decode}"

    def native_decode(self, device: torch.device, dtype: torch.dtype) -> bool:
        return (self.native is not None and device.type == "cpu" and dtype == self.native.dtype
                and self.native.supports(dtype, self.num_heads, self.num_kv_heads, self.head_dim))

    def mirror_cut_views(self, device: torch.device, dtype: torch.dtype) -> bool:
        # scaled_dot_product_attention takes the strided views at a contiguous tensor's speed, and so do
        # float32's batched matmuls; bfloat16's measured slower on them (cpu_matmul_cut_view_dtypes).
        return device.type == "cpu" and (dtype in self.sdpa_decode_dtypes or dtype in self.matmul_cut_view_dtypes)

    def forward(self, q, k, v, key_cache, value_cache, meta, layer):
        if meta.decode_tables is not None and not meta.prefill_groups:
            # Decodes alone: the native kernel writes each sequence's new key and value itself, a row per
            # thread, instead of two index_copy_ calls over the batch (50 us each in a batch-64 step).
            return self.native(q, key_cache, value_cache, meta.decode_tables, meta.decode_lens, self.block_size,
                               self.scale, k, v, meta.slot_mapping)
        key_cache.index_copy_(1, meta.slot_mapping, k.transpose(0, 1))
        value_cache.index_copy_(1, meta.slot_mapping, v.transpose(0, 1))
        parts = []
        if meta.decode_tables is not None:
            b = meta.num_decodes
            parts.append(self.native(q[:b], key_cache, value_cache, meta.decode_tables, meta.decode_lens,
                                     self.block_size, self.scale))
        elif meta.mirror is not None:
            b = meta.num_decodes
            parts.append(self._attend_mirror(q[:b], k[:b], v[:b], key_cache, value_cache, meta.mirror, layer))
        elif meta.num_decodes:
            b = meta.num_decodes
            keys = self._gather(key_cache, meta.decode_blocks, b)
            values = self._gather(value_cache, meta.decode_blocks, b)
            parts.append(self._attend(q[:b], b, 1, keys, values, meta.decode_bias))
        all_sdpa = q.device.type == "cpu" and q.dtype in self.sdpa_prefill_dtypes
        for g in meta.prefill_groups:
            rows = slice(g.token_start, g.token_start + g.num_seqs * g.chunk_len)
            if g.context_blocks is None and (all_sdpa or g.chunk_len >= self.sdpa_min_chunk):
                parts.append(self._causal_prefill(q[rows], k[rows], v[rows], g))
                continue
            if all_sdpa:
                parts.append(self._masked_prefill(q[rows], key_cache, value_cache, g))
                continue
            if g.context_blocks is None:  # the chunk is all the context there is: use its own k, v
                keys = self._kv_head_major(k[rows], g.num_seqs, g.chunk_len)
                values = self._kv_head_major(v[rows], g.num_seqs, g.chunk_len)
            else:
                keys = self._gather(key_cache, g.context_blocks, g.num_seqs)
                values = self._gather(value_cache, g.context_blocks, g.num_seqs)
            parts.append(self._attend(q[rows], g.num_seqs, g.chunk_len, keys, values, g.bias))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _causal_prefill(self, q, k, v, g: PrefillGroup):
        """A first chunk attends only to itself: is_causal lets the flash kernel skip the masked half.
        q [n*t, heads, d] -> [n*t, heads*d]."""
        n, t, kvh, d = g.num_seqs, g.chunk_len, self.num_kv_heads, self.head_dim
        keys = k.view(n, t, kvh, d).transpose(1, 2)
        values = v.view(n, t, kvh, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(q.view(n, t, self.num_heads, d).transpose(1, 2), keys, values,
                                             is_causal=True, enable_gqa=True)
        return out.transpose(1, 2).reshape(n * t, self.num_heads * d)

    def _masked_prefill(self, q, key_cache, value_cache, g: PrefillGroup):
        """A chunk over cached context: its sequences' blocks gathered from the pool (the chunk's own keys
        included, written above), attended with the group's mask. q [n*t, heads, d] -> [n*t, heads*d]."""
        n, t = g.num_seqs, g.chunk_len
        keys = self._gather(key_cache, g.context_blocks, n).transpose(0, 1)      # [n, kvh, L, d]
        values = self._gather(value_cache, g.context_blocks, n).transpose(0, 1)
        # The kernel takes a float mask only in the queries' dtype; 0 and -inf convert exactly.
        out = F.scaled_dot_product_attention(q.view(n, t, self.num_heads, -1).transpose(1, 2), keys, values,
                                             attn_mask=g.bias.to(q.dtype), enable_gqa=True)
        return out.transpose(1, 2).reshape(n * t, -1)

    def _gather(self, cache: torch.Tensor, rows: torch.Tensor, num_seqs: int) -> torch.Tensor:
        """[kvh, num_seqs, blocks * block_size, d]. Whole blocks along the first axis: index_select's
        fast path there measured 5x faster than along the block axis, and 3x than by token slot."""
        d = self.head_dim
        return cache.view(-1, self.block_size * d).index_select(0, rows).view(self.num_kv_heads, num_seqs, -1, d)

    def _attend_mirror(self, q, k, v, key_cache, value_cache, plan: MirrorPlan, layer: int):
        """The decodes, q [b, heads, d] and their new k, v [b, kv_heads, d], against their slots of the
        decode mirror. Returns [b, heads*d]."""
        s, kvh, g, d = plan.num_slots, self.num_kv_heads, self.group, self.head_dim
        # The slots attended over: a slice along the first axis, so still contiguous, and written through.
        keys = plan.keys[layer][plan.first_slot:plan.first_slot + s]
        values = plan.values[layer][plan.first_slot:plan.first_slot + s]
        keys[plan.slots, :, plan.positions] = k
        values[plan.slots, :, plan.positions] = v
        if plan.join_slots is not None:  # their whole context, from the pool this layer just wrote
            n, t = plan.join_slots.shape[0], plan.join_tokens
            keys[plan.join_slots, :, :t] = self._gather(key_cache, plan.join_blocks, n).transpose(0, 1)
            values[plan.join_slots, :, :t] = self._gather(value_cache, plan.join_blocks, n).transpose(0, 1)
        if plan.identity:
            qs = q
        else:  # holes get zero queries; their rows are dropped below
            qs = q.new_zeros(s, self.num_heads, d)
            qs[plan.slots] = q
        length = plan.attend_len
        if q.device.type == "cpu" and q.dtype in self.sdpa_decode_dtypes:
            # The kernel takes a float mask only in the queries' dtype; 0 and -inf convert exactly. It reads
            # the keys cut to the longest context in place (DecodeMirror's cut_views).
            out = F.scaled_dot_product_attention(qs.unsqueeze(2), keys[:, :, :length], values[:, :, :length],
                                                 enable_gqa=True, attn_mask=plan.bias.unsqueeze(2).to(q.dtype))
            out = out.view(s, self.num_heads * d)
            return out if plan.identity else out[plan.slots]
        qs = qs.reshape(s * kvh, g, d)
        # [slots * kv_heads, length, d] with no copy: the slots attended over are contiguous, and a cut
        # view's batch entries lie a capacity apart, which the batched products take as a stride.
        keys = keys[:, :, :length].view(s * kvh, length, d)
        values = values[:, :, :length].view(s * kvh, length, d)
        scores = torch.bmm(qs, keys.transpose(1, 2)).view(s, kvh * g, length)
        scores = torch.add(plan.bias, scores, alpha=self.scale)
        probs = scores.softmax(dim=-1).to(q.dtype).view(s * kvh, g, length)
        out = torch.bmm(probs, values).view(s, self.num_heads * d)
        return out if plan.identity else out[plan.slots]

    def _kv_head_major(self, x: torch.Tensor, n: int, t: int) -> torch.Tensor:
        return x.view(n, t, self.num_kv_heads, self.head_dim).permute(2, 0, 1, 3).contiguous()

    def _attend(self, q, n, t, keys, values, bias):
        """q [n*t, heads, d] against keys/values [kvh, n, L, d]; bias broadcasts to [kvh, n, group, t, L].
        Returns [n*t, heads*d]."""
        kvh, g, d = self.num_kv_heads, self.group, self.head_dim
        qg = q.view(n, t, kvh, g, d).permute(2, 0, 3, 1, 4)          # [kvh, n, g, t, d]
        context = keys.shape[2]
        # bmm on 3-d views: torch.matmul on the 4-d ones measured 1.5x slower for decode batches (it
        # copies the transposed keys to fold the batch dimensions).
        keys_t = keys.view(kvh * n, context, d).transpose(1, 2)
        values = values.view(kvh * n, context, d)
        step = max(1, min(t, self.max_score_bytes // max(1, 4 * kvh * n * g * context)))
        outs = []
        for lo in range(0, t, step):
            hi = min(t, lo + step)
            qs = qg[:, :, :, lo:hi].reshape(kvh * n, g * (hi - lo), d)
            scores = torch.bmm(qs, keys_t).view(kvh, n, g, hi - lo, context)
            b = bias[lo:hi] if bias.dim() == 2 else bias
            # One op scales, masks and (with a float32 bias) widens to float32 for the softmax.
            scores = torch.add(b, scores, alpha=self.scale)
            probs = scores.softmax(dim=-1).to(q.dtype).view(kvh * n, g * (hi - lo), context)
            outs.append(torch.bmm(probs, values).view(kvh, n, g, hi - lo, d))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=3)
        return out.permute(1, 3, 0, 2, 4).reshape(n * t, self.num_heads * d)
