"""Engine settings: which model, on which device, and how the KV pool and the batches are sized."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from engine.errors import InvalidRequestError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# How a step stopped at a safepoint ends (EngineConfig.preemption_mode).
PREEMPTION_MODES = ("discard", "drop", "park")


@dataclass
class EngineConfig:
    model: str | Path | None = None    # HF directory or .gguf file; None is the bundled SmolLM2
    dtype: str = "auto"                # "auto": bfloat16 where the device computes it natively, else float32
    device: str | None = None          # "cpu", "cuda", "cuda:N"; None picks CUDA when present
    block_size: int = 16
    num_kv_blocks: int | None = None   # KV pool size in blocks; else from kv_cache_bytes / free GPU memory
    kv_cache_bytes: int | None = None  # default on CPU: 1 GiB
    gpu_memory_utilization: float = 0.85
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None   # default: the model's context, capped by what the pool holds
    enable_chunked_prefill: bool = True
    # Decode mirror (engine/decode_mirror.py): most bytes its contiguous copy of the decoding sequences'
    # keys and values may take; None: twice the KV pool on CPU (within 20% of RAM), off on CUDA; 0: off.
    decode_mirror_bytes: int | None = None
    # Decode steps replayed from CUDA graphs (engine/decode_graphs.py): "auto" on CUDA only, "off", or
    # "on", which on a CPU runs the graphs' padded static-buffer path eagerly (to test it; no faster
    # there). With graphs on, the decode mirror is off; "auto" yields to a mirror asked for explicitly.
    decode_graphs: str = "auto"
    # Decode attention by the compiled paged kernel (engine/native_kernels.py), which reads the pool in
    # place: "auto" on CPU where it builds (a C compiler) and has a kernel for the model's head size and
    # dtype, unless the decode mirror or graphs are asked for explicitly (it replaces the one and
    # excludes the other); "on" requires it; "off" keeps PyTorch's path. The same library's row ops
    # (RMSNorm, SiLU-and-multiply, rotary embedding; engine/row_ops.py) come and go with it.
    native_decode: str = "auto"
    # ---- co-serving (engine/policy.py names the policies) ----
    policy: str = "conserve"           # "online-only", "fcfs", "priority" or "conserve"
    slo_ttft_ms: float = 1000.0        # online time-to-first-token target
    slo_tpot_ms: float = 100.0         # online time-per-output-token target: caps the predicted step time
                                       # of steps that carry offline tokens beside online decodes
    offline_max_batched_tokens: int | None = None  # budget of steps with no online work (default: max_num_batched_tokens)
    # Layer-wise preemption: "drop" the whole stopped step (its online decodes run again beside the
    # arrival, which waits for no remaining layers), "discard" only its offline work (its online rows
    # finish alone first, and the arrival waits for them), or "park" its hidden state. Measured on 2
    # cores (bench/coserve.py, same trace): arrivals beside online decodes waited 1-3 ms to be scheduled
    # with drop against 21-30 ms with discard, the decoding requests' TPOT unchanged (79.5-81.6 against
    # 79.8-81.3 ms); parked steps resumed beside new online work delayed its decodes.
    preemption_mode: str = "drop"
    # Host KV checkpoint store; default: twice the device pool, at most 40% of RAM split between the
    # GPUs this process sees; 0 = off.
    checkpoint_bytes: int | None = None
    # Share of the KV blocks and of the max_num_seqs seats that offline admission leaves free for online bursts.
    online_reserve_fraction: float = 0.1
    profile_cache_dir: str | Path | None = None  # cached step-latency profiles; default ~/.cache/conserve/profiles
    profile_seconds: float = 5.0       # time spent profiling step latency when no cached profile fits
    step_trace: int = 0                # keep the last N steps' shapes and times (Engine.step_trace()); 0 = off

    def validate(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "num_kv_blocks", "kv_cache_bytes",
                     "max_model_len"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise InvalidRequestError(f"{name} must be a positive integer, got {value!r}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise InvalidRequestError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        self.torch_dtype()
        self.torch_device()
        from engine.policy import Policy  # policy.py needs nothing from here; imported late to stay one-way
        Policy.parse(self.policy)
        if self.decode_graphs not in ("auto", "on", "off"):
            raise InvalidRequestError(f"decode_graphs must be 'auto', 'on' or 'off', got {self.decode_graphs!r}")
        if self.decode_graphs == "on" and self.decode_mirror_bytes:
            raise InvalidRequestError("decode_graphs='on' and a decode mirror exclude each other; set "
                                      "decode_mirror_bytes=0 or decode_graphs to 'auto' or 'off'")
        if self.native_decode not in ("auto", "on", "off"):
            raise InvalidRequestError(f"native_decode must be 'auto', 'on' or 'off', got {self.native_decode!r}")
        if self.native_decode == "on" and (self.decode_mirror_bytes or self.decode_graphs == "on"):
            raise InvalidRequestError("native_decode='on' excludes the decode mirror and decode graphs; set "
                                      "decode_mirror_bytes=0 and decode_graphs to 'auto' or 'off'")
        if self.preemption_mode not in PREEMPTION_MODES:
            raise InvalidRequestError(f"preemption_mode must be one of {', '.join(PREEMPTION_MODES)}, "
                                      f"got {self.preemption_mode!r}")
        for name in ("slo_ttft_ms", "slo_tpot_ms", "profile_seconds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise InvalidRequestError(f"{name} must be a positive number, got {value!r}")
        if self.offline_max_batched_tokens is not None and (
                not isinstance(self.offline_max_batched_tokens, int) or self.offline_max_batched_tokens < 1):
            raise InvalidRequestError(
                f"offline_max_batched_tokens must be a positive integer, got {self.offline_max_batched_tokens!r}")
        if self.decode_mirror_bytes is not None and (
                not isinstance(self.decode_mirror_bytes, int) or isinstance(self.decode_mirror_bytes, bool)
                or self.decode_mirror_bytes < 0):
            raise InvalidRequestError(
                f"decode_mirror_bytes must be a non-negative integer, got {self.decode_mirror_bytes!r}")
        if self.checkpoint_bytes is not None and (not isinstance(self.checkpoint_bytes, int) or self.checkpoint_bytes < 0):
            raise InvalidRequestError(f"checkpoint_bytes must be a non-negative integer, got {self.checkpoint_bytes!r}")
        if not isinstance(self.step_trace, int) or isinstance(self.step_trace, bool) or self.step_trace < 0:
            raise InvalidRequestError(f"step_trace must be a non-negative integer, got {self.step_trace!r}")
        if not 0.0 <= self.online_reserve_fraction < 1.0:
            raise InvalidRequestError(
                f"online_reserve_fraction must be in [0, 1), got {self.online_reserve_fraction!r}")

    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return auto_dtype(self.torch_device())
        try:
            return DTYPES[self.dtype]
        except KeyError:
            raise InvalidRequestError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {self.dtype!r}") from None

    def torch_device(self) -> torch.device:
        if self.device is None:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise InvalidRequestError(f"unknown device {self.device!r}; use cpu, cuda or cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise InvalidRequestError(f"device {self.device!r} asked for, but this torch sees no CUDA device")
        return device


def auto_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where the hardware computes in it, float32 where bfloat16 would only be emulated.

    A CPU without AVX-512 BF16 or AMX widens every bfloat16 operand in software: on a 2-core AVX2 EPYC,
    a bfloat16 matrix product ran 6x slower than float32 (15 against 95 GFLOP/s) and the bundled model
    generated 24 tokens/s against 84 in float32, whereas on an AVX-512 BF16 Xeon bfloat16 was the faster."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_native_bfloat16():
        return torch.bfloat16
    return torch.float32


def auto_dtype_name(device: str) -> str:
    """What "auto" resolves to on a device, by name ("bfloat16", "float32", ...)."""
    return str(auto_dtype(torch.device(device))).removeprefix("torch.")


def cpu_has_native_bfloat16() -> bool:
    return _cpu_has("_is_avx512_bf16_supported") or cpu_has_amx()


def cpu_has_amx() -> bool:
    return _cpu_has("_is_amx_tile_supported")


def _cpu_has(check: str) -> bool:
    """torch.cpu's private feature check of that name; False on a torch without it."""
    return getattr(getattr(torch, "cpu", None), check, lambda: False)()
