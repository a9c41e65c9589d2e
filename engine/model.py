"""The Llama-family transformer (Llama 2/3, SmolLM2, Mistral GQA) written for a paged KV cache."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from engine.attention import AttentionBackend, AttentionMetadata
from engine.errors import ModelLoadError
from engine.kv_cache import KVCache
from engine.linear import Linear
from engine.model_config import ModelConfig
from engine.norm import RMSNorm
from engine.rope import RotaryEmbedding, apply_rotary
from engine.row_ops import RowOps

# Called with the index of the layer about to run; True stops the step there (layer-wise preemption).
Safepoint = Callable[[int], bool]


@dataclass
class Parked:
    """A forward pass stopped at a safepoint: the hidden state entering `layer`. Layers before it have
    written their keys and values into the cache; resuming from here finishes the step as if it had
    never stopped."""
    layer: int
    hidden: torch.Tensor


@dataclass
class LayerWeights:
    input_norm: RMSNorm
    qkv: Linear              # q, k and v projections stacked: one matrix product instead of three
    o: Linear
    post_norm: RMSNorm
    gate_up: Linear          # gate and up projections stacked
    down: Linear


class LlamaModel:
    """Plain tensors and functional ops: fewer Python calls per layer than nn.Module, which a 135M model feels."""

    def __init__(self, config: ModelConfig, tensors: dict[str, torch.Tensor], backend: AttentionBackend,
                 max_positions: int, dtype: torch.dtype, device: torch.device, row_ops: RowOps | None = None):
        self.config = config
        self.backend = backend
        # The compiled row-wise ops (CPU, the model's dtype): norms, SiLU-and-multiply and the rotary
        # embedding in one call each, instead of PyTorch's chains of ops.
        self.row_ops = row_ops if row_ops is not None and row_ops.dtype == dtype and device.type == "cpu" else None

        def take(name: str) -> torch.Tensor:
            try:
                return tensors[name].to(device=device, dtype=dtype).contiguous()
            except KeyError:
                raise ModelLoadError(f"model weights lack tensor {name!r}") from None

        self.embed = take("model.embed_tokens.weight")
        self.layers = []
        for i in range(config.num_hidden_layers):
            p = f"model.layers.{i}."
            self.layers.append(LayerWeights(
                input_norm=RMSNorm(take(p + "input_layernorm.weight"), config.rms_norm_eps),
                qkv=Linear(torch.cat([take(p + f"self_attn.{n}_proj.weight") for n in "qkv"]).contiguous()),
                o=Linear(take(p + "self_attn.o_proj.weight")),
                post_norm=RMSNorm(take(p + "post_attention_layernorm.weight"), config.rms_norm_eps),
                gate_up=Linear(torch.cat([take(p + "mlp.gate_proj.weight"),
                                          take(p + "mlp.up_proj.weight")]).contiguous()),
                down=Linear(take(p + "mlp.down_proj.weight")),
            ))
        self.norm = RMSNorm(take("model.norm.weight"), config.rms_norm_eps)
        self.lm_head = Linear(take("lm_head.weight") if "lm_head.weight" in tensors else self.embed)
        self.rope = RotaryEmbedding(config, max_positions, dtype, device)
        h, kvh, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self._qkv_split = [h * d, kvh * d, kvh * d]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_cache: KVCache, logits_indices: torch.Tensor,
                safepoint: Safepoint | None = None, resume: Parked | None = None) -> torch.Tensor | Parked:
        """Run the step's tokens through every layer; return logits, in the model's dtype, for the rows in
        logits_indices only (the LM head is a fifth of a decode step, so prefill positions that sample
        nothing skip it). The sampler widens them to float32 only where it needs to: greedy rows take the
        argmax as they are (widening is exact, so it cannot change which token wins), and converting a
        batch-64 step's logits (64 x 49,152) cost 1-2 ms a step.

        `safepoint` is asked before each layer (the first one a resumed step runs excepted, so a resumed
        step always advances) and may stop the pass there: it then returns Parked, which `resume` takes
        back to finish the same step."""
        cos, sin = self.rope.lookup(positions)
        first = resume.layer if resume is not None else 0
        h = resume.hidden if resume is not None else F.embedding(input_ids, self.embed)
        for i in range(first, len(self.layers)):
            if safepoint is not None and (i > first or resume is None) and safepoint(i):
                return Parked(i, h)
            h = self.layer_forward(i, h, cos, sin, meta, kv_cache)
        return self.head(h[logits_indices])

    def layer_forward(self, i: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      meta: AttentionMetadata, kv_cache: KVCache) -> torch.Tensor:
        """Layer i on hidden states h [N, hidden] (cos, sin from rope.lookup); writes the layer's keys
        and values into the cache and returns the next hidden states. Also captured, layer by layer,
        into the decode steps' CUDA graphs (engine/decode_graphs.py)."""
        if self.row_ops is not None:
            return self._layer_forward_rows(i, h, cos, sin, meta, kv_cache)
        cfg = self.config
        n = h.shape[0]
        heads, kv_heads, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        layer = self.layers[i]
        x = layer.input_norm(h)
        qkv = layer.qkv(x)
        qk = qkv[:, : (heads + kv_heads) * d].view(n, heads + kv_heads, d)
        qk = apply_rotary(qk, cos, sin)
        q, k = qk[:, :heads], qk[:, heads:]
        v = qkv[:, (heads + kv_heads) * d:].view(n, kv_heads, d)
        attn = self.backend.forward(q, k, v, kv_cache.keys[i], kv_cache.values[i], meta, i)
        h = h + layer.o(attn)
        x = layer.post_norm(h)
        gate, up = layer.gate_up(x).chunk(2, dim=-1)
        return h + layer.down(F.silu(gate) * up)

    def _layer_forward_rows(self, i: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                            meta: AttentionMetadata, kv_cache: KVCache) -> torch.Tensor:
        """layer_forward with the compiled row ops, the same computation: the query and key heads rotated
        in place in the QKV product, the residual adds done in place into h (each layer's h is its own:
        the embedding's output or the layer before's; a parked step's is resumed once)."""
        cfg, ops = self.config, self.row_ops
        n = h.shape[0]
        heads, kv_heads, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        layer = self.layers[i]
        qkv = layer.qkv(ops.rms_norm(h, layer.input_norm.float_weight, layer.input_norm.eps))
        ops.rotary_(qkv, heads + kv_heads, d, cos, sin)
        q = qkv[:, : heads * d].view(n, heads, d)
        k = qkv[:, heads * d: (heads + kv_heads) * d].view(n, kv_heads, d)
        v = qkv[:, (heads + kv_heads) * d:].view(n, kv_heads, d)
        attn = self.backend.forward(q, k, v, kv_cache.keys[i], kv_cache.values[i], meta, i)
        x = ops.rms_norm(h, layer.post_norm.float_weight, layer.post_norm.eps, residual=layer.o(attn))
        return h.add_(layer.down(ops.silu_mul(layer.gate_up(x))))

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """The final norm and the LM head: logits for the hidden rows given."""
        if self.row_ops is not None:
            return self.lm_head(self.row_ops.rms_norm(h.contiguous(), self.norm.float_weight, self.norm.eps))
        h = self.norm(h)
        return self.lm_head(h)
