"""Reads a Hugging Face Llama/Mistral checkpoint directory (config.json + safetensors) into HF-named tensors."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from engine.errors import ModelLoadError
from engine.model_config import ModelConfig

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")


def expected_tensor_names(config: ModelConfig) -> set[str]:
    """The exact HF tensor names the engine needs for this config (lm_head only when untied)."""
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        names.update(p + s for s in (
            "input_layernorm.weight", "post_attention_layernorm.weight",
            "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
            "self_attn.o_proj.weight",
            "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
        ))
    if not config.tie_word_embeddings:
        names.add("lm_head.weight")
    return names


def expected_shape(config: ModelConfig, name: str) -> tuple[int, ...]:
    h, kv = config.hidden_size, config.num_key_value_heads * config.head_dim
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return (config.vocab_size, h)
    suffix = name.rsplit(".", 2)[-2]
    return {
        "q_proj": (config.num_attention_heads * config.head_dim, h),
        "k_proj": (kv, h),
        "v_proj": (kv, h),
        "o_proj": (h, config.num_attention_heads * config.head_dim),
        "gate_proj": (config.intermediate_size, h),
        "up_proj": (config.intermediate_size, h),
        "down_proj": (h, config.intermediate_size),
    }.get(suffix, (h,))


def check_tensors(config: ModelConfig, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Fail loudly on missing, unknown or misshapen tensors: silently dropping e.g. biases gives garbage output."""
    names = set(tensors)
    expected = expected_tensor_names(config)
    missing, unknown = sorted(expected - names), sorted(names - expected)
    if missing:
        raise ModelLoadError(f"{source}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unknown:
        raise ModelLoadError(
            f"{source}: tensors the Llama architecture does not use {unknown[:5]}"
            f"{' ...' if len(unknown) > 5 else ''} (biases and other extras are not supported)"
        )
    for name, t in tensors.items():
        if tuple(t.shape) != expected_shape(config, name):
            raise ModelLoadError(
                f"{source}: {name} has shape {tuple(t.shape)}, the config implies {expected_shape(config, name)}"
            )


def read_hf_config(path: Path) -> dict:
    config_file = path / "config.json"
    if not config_file.is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f"; to load a GGUF file pass its path, e.g. {path / ggufs[0]}" if ggufs else ""
        raise ModelLoadError(f"{path} has no config.json, so it is not a Hugging Face model directory{hint}")
    try:
        d = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {config_file}: {e}") from e
    archs = d.get("architectures") or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise ModelLoadError(
            f"unsupported architecture {archs or d.get('model_type')!r} in {config_file}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return d


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise ModelLoadError(f"cannot read {index}: {e}") from e
        files = [path / f for f in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise ModelLoadError(f"{path} is missing shards listed in its index: {absent}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path} has no *.safetensors files (PyTorch .bin checkpoints are not supported)")
    return files


def load_hf_dir(path: str | Path, dtype: torch.dtype) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Config and HF-named tensors (converted to dtype, on CPU) of a safetensors checkpoint directory."""
    from safetensors import safe_open
    from safetensors import SafetensorError

    path = Path(path)
    config = ModelConfig.from_hf_dict(read_hf_config(path))
    tensors: dict[str, torch.Tensor] = {}
    for file in _safetensors_files(path):
        try:
            # safe_open maps the file and materialises one tensor at a time, so peak memory is one
            # converted model plus one source tensor, not two whole models.
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():
                    if name.endswith("rotary_emb.inv_freq"):
                        continue
                    if name == "lm_head.weight" and config.tie_word_embeddings:
                        continue
                    tensors[name] = f.get_tensor(name).to(dtype)
        except (OSError, SafetensorError) as e:
            raise ModelLoadError(f"cannot read {file}: {e}") from e
    check_tensors(config, tensors, str(path))
    return config, tensors
