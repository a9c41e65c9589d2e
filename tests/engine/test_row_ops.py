"""The compiled row-wise ops (engine/row_ops.py): each against the PyTorch ops the model runs without them,
in float32 and bfloat16, on one thread and shared among threads, and their refusals."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.native_kernels import NativeBuildError, native_kernels
from engine.norm import RMSNorm
from engine.rope import apply_rotary
from tiny_models import TEST_DEVICE

pytestmark = pytest.mark.skipif(TEST_DEVICE != "cpu", reason="the row ops serve CPU steps")
DTYPES = [torch.float32, torch.bfloat16]


def _ops(dtype: torch.dtype):
    try:
        return native_kernels(dtype, 64).row_ops
    except NativeBuildError as e:  # a machine with no C compiler: the engine keeps PyTorch's path
        pytest.skip(f"native kernels unavailable here: {e}")


def _randn(*shape, dtype, seed, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


def _ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many representable values of their dtype lie between a and b (same-sign finite values)."""
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16}[a.dtype]
    return (a.view(bits).long() - b.view(bits).long()).abs()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 7, 64, 300])   # 300 x 576 rows are shared among threads
def test_rms_norm_after_the_residual_add_matches_pytorch(dtype, rows):
    ops = _ops(dtype)
    hidden = 576
    h = _randn(rows, hidden, dtype=dtype, seed=1)
    wide = _randn(rows, hidden + 64, dtype=dtype, seed=2)   # the residual's rows lie apart, as a slice's do
    residual = wide[:, :hidden]
    norm = RMSNorm(_randn(hidden, dtype=dtype, seed=3, scale=0.5) + 1, 1e-5)

    expected_h = h + residual
    expected = norm(expected_h)
    h_native = h.clone()
    out = ops.rms_norm(h_native, norm.float_weight, norm.eps, residual=residual)

    assert torch.equal(h_native, expected_h)   # the residual stream, rounded once as PyTorch's add rounds it
    # The sum of squares is taken in double and the inverse square root rounded correctly, so the rows are
    # within two float32 units of exact; PyTorch's float32 rows are not (its reciprocal is up to two
    # units off on this kind of CPU), so the two may differ by a few units, never more.
    exact = norm.float_weight.double() * expected_h.double() * torch.rsqrt(
        expected_h.double().square().mean(-1, keepdim=True) + norm.eps)
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), exact, rtol=2.5e-7, atol=0)
        assert _ulps_apart(out, expected).max() <= 4
    else:  # rounded to bfloat16, the same but for a rare last-place difference
        apart = _ulps_apart(out, expected)
        assert apart.max() <= 1 and (apart > 0).float().mean() < 0.01
    # Without a residual: the norm alone, h untouched.
    before = h.clone()
    assert _ulps_apart(ops.rms_norm(h, norm.float_weight, norm.eps), norm(h)).max() <= 4
    assert torch.equal(h, before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 64, 200])   # 200 x 1,536 are shared among threads
def test_silu_and_multiply_matches_pytorch(dtype, rows):
    ops = _ops(dtype)
    inter = 1536
    # Gate values over the whole range SiLU bends in.
    gate_up = _randn(rows, 2 * inter + 32, dtype=dtype, seed=4, scale=6.0)[:, : 2 * inter]
    gate, up = gate_up.chunk(2, dim=-1)
    expected = F.silu(gate) * up
    out = ops.silu_mul(gate_up)
    assert out.shape == (rows, inter) and out.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=0)
    else:  # SiLU rounded to bfloat16 before the product, as PyTorch rounds it: equal but for exp's last bits
        assert _ulps_apart(out, expected).max() <= 1
        assert (out != expected).float().mean() < 0.005


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_far_out_on_both_sides(dtype):
    gate = torch.tensor([-1000.0, -100.0, -88.0, -87.0, -30.0, 0.0, 30.0, 100.0, 1000.0]).to(dtype)
    gate_up = torch.cat((gate, torch.ones_like(gate))).unsqueeze(0)
    out = _ops(dtype).silu_mul(gate_up)[0]
    assert torch.isfinite(out).all()
    # Beyond -87 PyTorch's exp(-x) overflows toward 0 results; these stay as small (below 1e-35).
    torch.testing.assert_close(out.float(), F.silu(gate.float()).to(dtype).float(), rtol=1e-2, atol=1e-35)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 64, 150])   # 150 rows of 12 heads of 64 are shared among threads
def test_rotary_in_place_is_bit_identical_to_pytorch(dtype, rows):
    ops = _ops(dtype)
    heads, kv_heads, d = 9, 3, 64
    qkv = _randn(rows, (heads + 2 * kv_heads) * d, dtype=dtype, seed=5)
    angles = torch.rand(rows, d // 2, generator=torch.Generator().manual_seed(6)) * 50
    cos = torch.cat((angles.cos(), angles.cos()), dim=-1).to(dtype).unsqueeze(1)
    signed_sin = torch.cat((-angles.sin(), angles.sin()), dim=-1).to(dtype).unsqueeze(1)
    qk = qkv[:, : (heads + kv_heads) * d].view(rows, heads + kv_heads, d)
    expected = apply_rotary(qk, cos, signed_sin)
    values = qkv[:, (heads + kv_heads) * d:].clone()

    ops.rotary_(qkv, heads + kv_heads, d, cos, signed_sin)
    assert torch.equal(qkv[:, : (heads + kv_heads) * d].view(rows, heads + kv_heads, d), expected)
    assert torch.equal(qkv[:, (heads + kv_heads) * d:], values)   # the value heads are left alone


@pytest.mark.parametrize("dtype", DTYPES)
def test_results_do_not_depend_on_the_thread_count(dtype):
    ops = _ops(dtype)
    h = _randn(512, 576, dtype=dtype, seed=7)
    weight = _randn(576, dtype=torch.float32, seed=8)
    gate_up = _randn(512, 3072, dtype=dtype, seed=9)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append((ops.rms_norm(h, weight, 1e-6), ops.silu_mul(gate_up)))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_refusals():
    ops = _ops(torch.float32)
    weight = torch.ones(8)
    with pytest.raises(ValueError, match="float32 CPU tensors"):
        ops.rms_norm(torch.ones(2, 8, dtype=torch.bfloat16), weight, 1e-6)
    with pytest.raises(ValueError, match="contiguous rows"):
        ops.rms_norm(torch.ones(8, 2).t(), weight, 1e-6)
    with pytest.raises(ValueError, match="float32 weight"):
        ops.rms_norm(torch.ones(2, 8), torch.ones(7), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        ops.rms_norm(torch.ones(2, 8), weight, 1e-6, residual=torch.ones(3, 8))
    with pytest.raises(ValueError, match="gate then up"):
        ops.silu_mul(torch.ones(2, 7))
    with pytest.raises(ValueError, match="even head_dim"):
        ops.rotary_(torch.ones(2, 10), 2, 5, torch.ones(2, 5), torch.ones(2, 5))
    with pytest.raises(ValueError, match="cos and sin"):
        ops.rotary_(torch.ones(2, 16), 2, 8, torch.ones(3, 8), torch.ones(3, 8))
