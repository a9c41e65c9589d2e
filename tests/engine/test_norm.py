"""RMSNorm: F.rms_norm's result (float32 math, one rounding) computed with fewer passes in bfloat16 on
the CPU, and F.rms_norm itself in float32."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.norm import RMSNorm


@pytest.mark.parametrize("rows", [1, 64, 700])
def test_bfloat16_rows_match_f_rms_norm_to_one_unit(rows):
    torch.manual_seed(rows)
    x = (torch.randn(rows, 576) * 3).bfloat16()
    weight = (torch.rand(576) + 0.5).bfloat16()
    out = RMSNorm(weight, 1e-5)(x)
    expected = F.rms_norm(x, (576,), weight, 1e-5)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    # The float32 sums differ only in order: where the two round differently, they are one unit apart.
    diff = out.float() - expected.float()
    unit = torch.finfo(torch.bfloat16).eps * expected.float().abs()
    assert (diff.abs() <= unit * 1.01).all()
    assert (out == expected).float().mean() > 0.999
    # and against float32 math, rounded once, the same holds
    reference = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5) * weight.float())
    assert ((out.float() - reference).abs() <= torch.finfo(torch.bfloat16).eps * reference.abs()).all()


def test_float32_is_f_rms_norm_bit_for_bit():
    x = torch.randn(5, 64)
    weight = torch.rand(64)
    assert torch.equal(RMSNorm(weight, 1e-6)(x), F.rms_norm(x, (64,), weight, 1e-6))
