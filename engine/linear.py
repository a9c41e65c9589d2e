"""Linear layers (y = x @ W^T) with weights prepacked for oneDNN on CPU when that is faster."""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


class Linear:
    """A weight and how to multiply by it.

    On CPU in bfloat16 the weight is reordered once into oneDNN's blocked layout. F.linear reorders
    it on every call instead: measured with SmolLM2's shapes on 2 cores, prepacked products are
    1.2-2x faster at decode batch sizes (1-256 rows) and bit-identical; only the 2048-row prefill
    product of the widest matrix got slower (7.5 -> 8.8 ms), a smaller loss than the decode gain.
    float32 keeps F.linear, whose results the tests compare with transformers exactly."""

    def __init__(self, weight: torch.Tensor):
        self._packed = _prepack(weight)
        # The plain copy is only needed when nothing was packed (a tied LM head's stays alive as the
        # embedding table anyway).
        self.weight = weight if self._packed is None else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, None, "none", [], "")
        return F.linear(x, self.weight)


def _prepack(weight: torch.Tensor) -> torch.Tensor | None:
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 64)
        probe = torch.randn(3, weight.shape[1], dtype=weight.dtype)
        same = torch.equal(torch.ops.mkldnn._linear_pointwise(probe, packed, None, "none", [], ""),
                           F.linear(probe, weight))
    except (AttributeError, RuntimeError) as exc:  # a torch without these private oneDNN ops
        log.debug("oneDNN weight prepacking unavailable: %s", exc)
        return None
    return packed if same else None
