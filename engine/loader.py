"""Loads a model (bundled default, Hugging Face directory or GGUF file) into config, tensors and tokenizer."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.bundled import BUNDLED_MODEL_NAME, default_model_path
from engine.errors import ModelLoadError
from engine.model_config import ModelConfig
from engine.tokenizer import Tokenizer

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# "-Q4_K_M", ".Q4_1", "-f16" ...: the quantisation tag llama.cpp tools append to a model's file name.
_QUANT_SUFFIX = re.compile(r"[.\-_](?:I?Q\d\w*|B?F16|F32)$", re.IGNORECASE)


@dataclass
class LoadedModel:
    config: ModelConfig
    tensors: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    name: str


def model_name(path: Path) -> str:
    """Short model id: a directory's name, or a GGUF file's stem without its quantisation tag."""
    if path.is_dir():
        return path.resolve().name
    stem = path.name[: -len(".gguf")] if path.name.lower().endswith(".gguf") else path.stem
    return _QUANT_SUFFIX.sub("", stem) or stem


def load_model(path: str | Path | None, dtype: torch.dtype) -> LoadedModel:
    """Load weights (as dtype, on CPU) and tokenizer; path None means the bundled SmolLM2-135M-Instruct."""
    from engine.gguf_header import read_gguf_header
    from engine.weights_gguf import load_gguf
    from engine.weights_hf import load_hf_dir

    if dtype not in SUPPORTED_DTYPES:
        raise ModelLoadError(f"unsupported dtype {dtype}; use one of {', '.join(map(str, SUPPORTED_DTYPES))}")
    bundled = path is None
    path = default_model_path() if bundled else Path(path).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist")
    name = BUNDLED_MODEL_NAME if bundled else model_name(path)
    if path.is_dir():
        config, tensors = load_hf_dir(path, dtype)
        return LoadedModel(config, tensors, Tokenizer.from_hf_dir(path), name)
    if path.suffix.lower() == ".gguf":
        header = read_gguf_header(path)  # one read for weights and tokenizer
        config, tensors = load_gguf(path, dtype, header=header)
        tokenizer = Tokenizer.from_gguf(path, metadata=header.metadata)
        return LoadedModel(config, tensors, tokenizer, name)
    raise ModelLoadError(
        f"{path} is neither a Hugging Face model directory nor a .gguf file"
    )
