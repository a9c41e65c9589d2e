"""dtype "auto": bfloat16 only where the hardware computes it, float32 where it would be emulated."""
from __future__ import annotations

import torch

from engine.config import EngineConfig, auto_dtype, cpu_has_native_bfloat16


def test_auto_on_cpu_follows_native_bfloat16_support():
    expected = torch.bfloat16 if cpu_has_native_bfloat16() else torch.float32
    assert auto_dtype(torch.device("cpu")) == expected
    assert EngineConfig(dtype="auto", device="cpu").torch_dtype() == expected


def test_auto_is_the_default_and_explicit_dtypes_are_kept():
    assert EngineConfig().dtype == "auto"
    assert EngineConfig(dtype="bfloat16", device="cpu").torch_dtype() == torch.bfloat16
    assert EngineConfig(dtype="float32", device="cpu").torch_dtype() == torch.float32
