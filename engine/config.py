"""Engine settings: which model, on which device, and how the KV pool and the batches are sized."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from engine.errors import InvalidRequestError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EngineConfig:
    model: str | Path | None = None    # HF directory or .gguf file; None is the bundled SmolLM2
    dtype: str = "bfloat16"
    device: str | None = None          # "cpu", "cuda", "cuda:N"; None picks CUDA when present
    block_size: int = 16
    num_kv_blocks: int | None = None   # KV pool size in blocks; else from kv_cache_bytes / free GPU memory
    kv_cache_bytes: int | None = None  # default on CPU: 1 GiB
    gpu_memory_utilization: float = 0.85
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None   # default: the model's context, capped by what the pool holds
    enable_chunked_prefill: bool = True

    def torch_dtype(self) -> torch.dtype:
        try:
            return DTYPES[self.dtype]
        except KeyError:
            raise InvalidRequestError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}") from None

    def torch_device(self) -> torch.device:
        if self.device is None:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            return torch.device(self.device)
        except RuntimeError:
            raise InvalidRequestError(f"unknown device {self.device!r}; use cpu, cuda or cuda:N") from None
