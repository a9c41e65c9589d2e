"""Prepacked linear layers: bfloat16 exactly what F.linear gives, float32 within rounding of it, and a
row's result independent of the rows batched with it (the engine's batched and lone outputs match)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.linear import Linear

# oneDNN packs bfloat16 weights only on CPUs with AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT; elsewhere
# Linear must fall back to F.linear, with the same results.
ONEDNN_BF16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
ONEDNN = torch.backends.mkldnn.is_available()


@pytest.fixture(autouse=True)
def fresh_verdicts(monkeypatch):
    """Each test probes its shapes itself: the verdicts of earlier tests (and engines) are set aside."""
    import engine.linear as linear
    monkeypatch.setattr(linear, "_verdicts", {})


@pytest.mark.parametrize("rows", [1, 7, 64, 300])
def test_prepacked_bf16_linear_equals_f_linear(rows):
    torch.manual_seed(rows)
    weight = torch.randn(96, 40, dtype=torch.bfloat16)
    layer = Linear(weight)
    assert (layer._packed is not None) == ONEDNN_BF16, (
        f"oneDNN bf16 support is {ONEDNN_BF16}, so the weight should {'' if ONEDNN_BF16 else 'not '}be prepacked")
    x = torch.randn(rows, 40, dtype=torch.bfloat16)
    assert torch.equal(layer(x), F.linear(x, weight))


@pytest.mark.parametrize("rows", [1, 7, 64, 300])
def test_float32_linear_is_prepacked_and_within_rounding_of_f_linear(rows):
    torch.manual_seed(rows)
    weight = torch.randn(3072, 576)
    layer = Linear(weight)
    assert (layer._packed is not None) == ONEDNN
    x = torch.randn(rows, 576)
    ours, reference = layer(x), F.linear(x, weight)
    # Sums of 576 products of magnitude ~1: float32 rounding in another order moves them by ~1e-5.
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_rows_result_does_not_depend_on_the_rows_beside_it(dtype):
    torch.manual_seed(0)
    layer = Linear(torch.randn(960, 576, dtype=dtype))
    x = torch.randn(300, 576, dtype=dtype)
    batched = layer(x)
    for rows in (1, 7, 64):
        assert torch.equal(layer(x[:rows]), batched[:rows])


@pytest.mark.skipif(not ONEDNN_BF16, reason="no oneDNN bfloat16 packing on this CPU")
def test_a_packed_product_that_changes_with_the_batch_is_not_used_where_f_linear_does_not(monkeypatch):
    import engine.linear as linear
    real = linear._packed_product

    def batch_dependent(x, packed):  # what that server CPU's oneDNN did: small batches come out different
        out = real(x, packed)
        return out + 1 if x.shape[0] < linear.PROBE_BATCH else out

    monkeypatch.setattr(linear, "_packed_product", batch_dependent)
    torch.manual_seed(0)
    weight = torch.randn(96, 40, dtype=torch.bfloat16)
    x = torch.randn(linear.PROBE_BATCH, 40, dtype=torch.bfloat16)
    f_linear_invariant = all(torch.equal(F.linear(x[:rows], weight), F.linear(x, weight)[:rows]) for rows in (1, 7))
    layer = Linear(weight)
    assert (layer._packed is None) == f_linear_invariant
    if f_linear_invariant:
        assert torch.equal(layer(x[:7]), F.linear(x[:7], weight))


@pytest.mark.skipif(not ONEDNN_BF16, reason="no oneDNN bfloat16 packing on this CPU")
def test_each_shape_is_probed_once_and_its_verdict_holds_for_the_next_weights(monkeypatch):
    import engine.linear as linear
    probes = []
    real = linear._probe_passes
    monkeypatch.setattr(linear, "_probe_passes", lambda *a: probes.append(a[0].shape) or real(*a))
    torch.manual_seed(0)
    weights = [torch.randn(96, 40, dtype=torch.bfloat16) for _ in range(3)] + [torch.randn(40, 96, dtype=torch.bfloat16)]
    layers = [Linear(w) for w in weights]
    assert probes == [torch.Size([96, 40]), torch.Size([40, 96])]
    assert all(layer._packed is not None for layer in layers)
    x = torch.randn(7, 40, dtype=torch.bfloat16)
    for layer, weight in zip(layers[:3], weights):  # packed on the first one's verdict, still F.linear's
        assert torch.equal(layer(x), F.linear(x, weight))

    monkeypatch.setattr(linear, "_probe_passes", lambda *a: probes.append(a[0].shape) or False)
    refused = [Linear(torch.randn(64, 40, dtype=torch.bfloat16)) for _ in range(2)]
    assert probes[2:] == [torch.Size([64, 40])]  # refused once, then not packed nor probed again
    assert all(layer._packed is None and layer.weight is not None for layer in refused)
