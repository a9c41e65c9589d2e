"""Reads a llama.cpp GGUF file (any quantisation gguf-py can dequantise) into a config and HF-named tensors.
The header is read by engine/gguf_header.py, which steps over the vocabulary, and engine/gguf_dequant.py
dequantises (in torch for the common block types, with gguf-py for the rest)."""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.errors import ModelLoadError
from engine.gguf_dequant import dequantize
from engine.gguf_header import GGUFHeader, GGUFTensor, read_gguf_header
from engine.model_config import ModelConfig
from engine.weights_hf import check_tensors

# llama.cpp writes Mistral and Llama 1/2/3 alike under the "llama" architecture.
SUPPORTED_ARCHITECTURES = ("llama",)

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def hf_name(gguf_name: str) -> str | None:
    """HF Llama name of a GGUF tensor, or None if it has no counterpart."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_TENSOR.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.weight"
    return None


def unpermute_rope_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf.py's permute() of q/k rows, giving HF's rotate-half layout back.

    llama.cpp rotates adjacent pairs (x0, x1), HF rotates halves (x0, x_{d/2}); the converter
    reorders each head's rows from [half0 | half1] to interleaved. For k, n_head is the number
    of KV heads.
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _dequantize(tensor: GGUFTensor) -> torch.Tensor:
    try:
        values = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as e:
        raise ModelLoadError(f"tensor {tensor.name}: {e}") from e
    # GGUF lists dimensions fastest-first, torch slowest-first.
    return values.reshape(tuple(int(d) for d in reversed(tensor.shape)))


def _rope_scaling(meta: dict[str, Any], arch: str, rope_freqs: np.ndarray | None,
                  head_dim: int, theta: float) -> dict[str, Any] | None:
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if kind is None and meta.get(f"{arch}.rope.scale_linear") is not None:
        kind, factor = "linear", meta[f"{arch}.rope.scale_linear"]
    if rope_freqs is not None:
        if kind not in (None, "none"):
            raise ModelLoadError(f"GGUF has both rope_freqs and rope scaling type {kind!r}; not supported")
        return _llama3_scaling_from_freq_factors(rope_freqs, head_dim, theta)
    if kind in (None, "none"):
        return None
    scaling: dict[str, Any] = {"rope_type": kind, "factor": float(factor if factor is not None else 1.0)}
    orig = meta.get(f"{arch}.rope.scaling.original_context_length")
    if orig is not None:
        scaling["original_max_position_embeddings"] = int(orig)
    return scaling


def _llama3_scaling_from_freq_factors(factors: np.ndarray, head_dim: int, theta: float) -> dict[str, Any]:
    """Recover HF's llama3 rope_scaling dict from the rope_freqs tensor that replaces it in GGUF.

    llama.cpp stores only per-frequency divisors; its converter derives them with
    low_freq_factor=1, high_freq_factor=4 and original context 8192 (what Llama 3.1/3.2 use),
    so assume those, and check the divisors they give match the stored ones.
    """
    factors = factors.reshape(-1).astype(np.float64)
    s = {"rope_type": "llama3", "factor": float(factors.max()), "low_freq_factor": 1.0,
         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    expected = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < s["original_max_position_embeddings"] / s["high_freq_factor"]:
            expected.append(1.0)
        elif wavelen > s["original_max_position_embeddings"] / s["low_freq_factor"]:
            expected.append(s["factor"])
        else:
            smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (
                s["high_freq_factor"] - s["low_freq_factor"])
            expected.append(1 / ((1 - smooth) / s["factor"] + smooth))
    if len(expected) != len(factors) or not np.allclose(factors, expected, rtol=1e-3):
        raise ModelLoadError("GGUF rope_freqs tensor does not match llama3 rope scaling; not supported")
    return s


def _hf_config_dict(meta: dict[str, Any], array_lengths: dict[str, int], tied: bool,
                    rope_freqs: np.ndarray | None) -> dict[str, Any]:
    a = meta.get("general.architecture")
    if a not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"unsupported GGUF architecture {a!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )

    def need(key: str) -> Any:
        if f"{a}.{key}" not in meta:
            raise ModelLoadError(f"GGUF metadata lacks {a}.{key}")
        return meta[f"{a}.{key}"]

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = int(meta.get(f"{a}.attention.key_length") or hidden // heads)
    rope_dim = int(meta.get(f"{a}.rope.dimension_count") or head_dim)
    if rope_dim != head_dim:
        raise ModelLoadError(f"partial rotary embeddings (rope dim {rope_dim} of head dim {head_dim}) not supported")
    vocab = meta.get(f"{a}.vocab_size")
    if vocab is None:
        vocab = array_lengths.get("tokenizer.ggml.tokens")
    if vocab is None:
        raise ModelLoadError("GGUF metadata has neither a vocab_size nor a token list")
    theta = float(meta.get(f"{a}.rope.freq_base", 10000.0))
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return {
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get(f"{a}.attention.head_count_kv") or heads),
        "head_dim": head_dim,
        "rms_norm_eps": float(meta.get(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": theta,
        "rope_scaling": _rope_scaling(meta, a, rope_freqs, head_dim, theta),
        "max_position_embeddings": int(meta.get(f"{a}.context_length", 2048)),
        "tie_word_embeddings": tied,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": None if eos is None else int(eos),
    }


def load_gguf(path: str | Path, dtype: torch.dtype,
              header: GGUFHeader | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Config and dequantised HF-named tensors (dtype, CPU) of a GGUF file; pass `header` to reuse one read."""
    header = header if header is not None else read_gguf_header(path)
    meta = header.metadata
    by_name = {t.name: t for t in header.tensors}
    rope_freqs = _dequantize(by_name["rope_freqs.weight"]).numpy() if "rope_freqs.weight" in by_name else None
    config = ModelConfig.from_hf_dict(
        _hf_config_dict(meta, header.array_lengths, tied="output.weight" not in by_name, rope_freqs=rope_freqs)
    )

    tensors: dict[str, torch.Tensor] = {}
    for gname, t in by_name.items():
        if gname == "rope_freqs.weight":
            continue
        name = hf_name(gname)
        if name is None:
            raise ModelLoadError(f"{path}: GGUF tensor {gname!r} has no place in the Llama architecture")
        w = _dequantize(t)
        if name.endswith("q_proj.weight"):
            w = unpermute_rope_rows(w, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            w = unpermute_rope_rows(w, config.num_key_value_heads)
        tensors[name] = w.to(dtype).contiguous()
    check_tensors(config, tensors, str(path))
    return config, tensors
