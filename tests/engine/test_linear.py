"""Prepacked bf16 linear layers give exactly what F.linear gives, for every batch size a step can have."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.linear import Linear

# oneDNN packs bfloat16 weights only on CPUs with AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT; elsewhere
# Linear must fall back to F.linear, with the same results.
ONEDNN_BF16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()


@pytest.mark.parametrize("rows", [1, 7, 64, 300])
def test_prepacked_bf16_linear_equals_f_linear(rows):
    torch.manual_seed(rows)
    weight = torch.randn(96, 40, dtype=torch.bfloat16)
    layer = Linear(weight)
    assert (layer._packed is not None) == ONEDNN_BF16, (
        f"oneDNN bf16 support is {ONEDNN_BF16}, so the weight should {'' if ONEDNN_BF16 else 'not '}be prepacked")
    x = torch.randn(rows, 40, dtype=torch.bfloat16)
    assert torch.equal(layer(x), F.linear(x, weight))


def test_float32_linear_is_not_repacked():
    weight = torch.randn(8, 4)
    layer = Linear(weight)
    x = torch.randn(3, 4)
    assert layer._packed is None and torch.equal(layer(x), F.linear(x, weight))
