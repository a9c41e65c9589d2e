"""Linear layers (y = x @ W^T) with weights prepacked for oneDNN on CPU."""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


class Linear:
    """A weight and how to multiply by it.

    On CPU the weight is reordered once into oneDNN's blocked layout. F.linear reorders it (bfloat16)
    or calls MKL's sgemm (float32) on every call instead. Measured with SmolLM2's shapes on 2 cores:
    - bfloat16 on an AVX-512 BF16 Xeon: prepacked products 1.2-2x faster at decode batch sizes (1-256
      rows) and bit-identical; only the 2048-row prefill product of the widest matrix got slower
      (7.5 -> 8.8 ms), a smaller loss than the decode gain.
    - float32 on an AVX2 EPYC: 1.5-2x faster at 1-64 rows and 1.3x at 2048 (MKL is slow on AMD), and
      batch-invariant (a row's result does not depend on the rows beside it, which MKL's did not
      guarantee), differing from F.linear only in the last bits of the float32 sums.
    oneDNN packs bfloat16 only on CPUs with AVX-512 or AVX-NE-CONVERT; elsewhere F.linear is used."""

    def __init__(self, weight: torch.Tensor):
        self._packed = _prepack(weight)
        # The plain copy is only needed when nothing was packed (a tied LM head's stays alive as the
        # embedding table anyway).
        self.weight = weight if self._packed is None else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is not None:
            return _packed_product(x, self._packed)
        return F.linear(x, self.weight)


# Row counts the packed product is checked at against a batch of PROBE_BATCH rows: a lone decode and an
# odd small batch. On one machine (torch 2.11, a 16-core server Xeon) the packed bfloat16 product
# equalled F.linear at 3 rows but not at 7, which a three-row probe alone had let through; and there
# neither the packed nor F.linear's float32 rows were independent of the batch beside them.
PROBE_ROWS = (1, 7)
PROBE_BATCH = 64


# Whether packing passed the probes, by (shape, dtype, threads): what the probes test (the products'
# rounding, and whether a row depends on its batch) follows from the kernel oneDNN picks for a shape,
# not from the weight's values, so each shape is probed once per process. Building SmolLM2's model
# (121 products, five shapes) took 0.14-0.25 s in bfloat16 and 0.27-0.45 s in float32 so, against
# 0.31-0.40 and 0.61-0.62 s probing every weight.
_verdicts: dict[tuple[tuple[int, ...], torch.dtype, int], bool] = {}


def _prepack(weight: torch.Tensor) -> torch.Tensor | None:
    if (weight.device.type != "cpu" or weight.dtype not in (torch.bfloat16, torch.float32)
            or not torch.backends.mkldnn.is_available()):
        return None
    key = (tuple(weight.shape), weight.dtype, torch.get_num_threads())
    if _verdicts.get(key) is False:
        return None
    try:
        # 64: the row count the blocking is tuned for; measured on float32 against 1, 512 and 2048,
        # it was as fast as any at 1 and 2048 rows and the fastest at 16-64 (decode batches).
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 64)
        if key in _verdicts:
            return packed
        probe = torch.randn(PROBE_BATCH, weight.shape[1], dtype=weight.dtype,
                            generator=torch.Generator().manual_seed(0))
        batched = _packed_product(probe, packed)
        alone = [_packed_product(probe[:rows], packed) for rows in PROBE_ROWS]
    except (AttributeError, RuntimeError) as exc:  # a torch without these private oneDNN ops, or a CPU they refuse
        log.debug("oneDNN weight prepacking unavailable: %s", exc)
        return None
    passes = _verdicts[key] = _probe_passes(weight, probe, batched, alone)
    return packed if passes else None


def _probe_passes(weight: torch.Tensor, probe: torch.Tensor, batched: torch.Tensor,
                  alone: list[torch.Tensor]) -> bool:
    reference = F.linear(probe, weight)
    if weight.dtype == torch.bfloat16:
        same = torch.equal(batched, reference)
    else:  # float32 sums in another order: equal to within rounding
        same = torch.allclose(batched, reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))
    if not same:
        return False
    # A row's result should not depend on the rows batched with it (batched and lone outputs match).
    if all(torch.equal(a, batched[:len(a)]) for a in alone):
        return True
    # Where F.linear keeps that property and the packed product does not, F.linear it is; where
    # neither does (float32 on that server CPU), the packed product is at least the faster.
    if all(torch.equal(F.linear(probe[:rows], weight), reference[:rows]) for rows in PROBE_ROWS):
        log.info("oneDNN prepacked products change with the batch on this CPU; using F.linear")
        return False
    return True


def _packed_product(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
