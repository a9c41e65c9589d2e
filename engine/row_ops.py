"""The compiled row-wise steps of a Llama layer (engine/native/row_ops.c): RMSNorm with the residual add
before it, SiLU-and-multiply, and the rotary embedding, each one call in place of a chain of PyTorch
ops. Loaded from the library engine/native_kernels.py builds; CPU tensors of one dtype only."""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch

_P, _I64, _INT, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
MAX_ROTARY_HEAD_DIM = 512


class RowOps:
    def __init__(self, library: Path, dtype: torch.dtype):
        self.path, self.dtype = library, dtype
        lib = ctypes.CDLL(str(library))
        self._rms_norm = lib.rms_norm
        self._rms_norm.argtypes = [_P, _P, _I64, _P, _P, _INT, _INT, _F, _INT]
        self._silu_mul = lib.silu_mul
        self._silu_mul.argtypes = [_P, _I64, _P, _INT, _INT, _INT]
        self._rotary = lib.rotary
        self._rotary.argtypes = [_P, _I64, _INT, _INT, _INT, _P, _P, _INT]
        for fn in (self._rms_norm, self._silu_mul, self._rotary):
            fn.restype = None

    def _check(self, *tensors: torch.Tensor) -> None:
        for t in tensors:
            if t.dtype != self.dtype or t.device.type != "cpu":
                raise ValueError(f"these row ops serve {self.dtype} CPU tensors, got {t.dtype} on {t.device}")

    def rms_norm(self, h: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> torch.Tensor:
        """RMSNorm(h) * weight for h [rows, hidden] (contiguous), weight float32 [hidden]. With `residual`
        [rows, hidden] (rows any stride apart), h += residual first, in place: h is the residual stream."""
        rows, hidden = h.shape
        self._check(h)
        if not h.is_contiguous() or weight.dtype != torch.float32 or weight.shape != (hidden,):
            raise ValueError("rms_norm needs contiguous rows and a float32 weight of the rows' width")
        add, add_stride = 0, 0
        if residual is not None:
            self._check(residual)
            if residual.shape != h.shape or residual.stride(1) != 1:
                raise ValueError(f"the residual must be [{rows}, {hidden}] with contiguous rows")
            add, add_stride = residual.data_ptr(), residual.stride(0)
        out = torch.empty_like(h)
        self._rms_norm(h.data_ptr(), add, add_stride, weight.data_ptr(), out.data_ptr(), rows, hidden, eps,
                       torch.get_num_threads())
        return out

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """SiLU(gate) * up for gate_up [rows, 2 * inter] (gate, then up; rows any stride apart)."""
        rows, width = gate_up.shape
        self._check(gate_up)
        if width % 2 or gate_up.stride(1) != 1:
            raise ValueError("silu_mul needs rows of gate then up, each contiguous")
        out = torch.empty(rows, width // 2, dtype=gate_up.dtype)
        self._silu_mul(gate_up.data_ptr(), gate_up.stride(0), out.data_ptr(), rows, width // 2,
                       torch.get_num_threads())
        return out

    def rotary_(self, x: torch.Tensor, heads: int, head_dim: int, cos: torch.Tensor,
                signed_sin: torch.Tensor) -> None:
        """Rotate, in place, the first `heads` heads of head_dim elements of each row of x [rows, >= heads *
        head_dim] (rows any stride apart): x * cos + rotate_half(x) * sin, with cos and signed sin [rows,
        head_dim] (or [rows, 1, head_dim]) as engine/rope.py looks them up."""
        rows = x.shape[0]
        self._check(x, cos, signed_sin)
        if (x.stride(1) != 1 or x.shape[1] < heads * head_dim or head_dim % 2 or head_dim > MAX_ROTARY_HEAD_DIM
                or not (cos.is_contiguous() and signed_sin.is_contiguous())
                or cos.numel() != rows * head_dim or signed_sin.numel() != rows * head_dim):
            raise ValueError(f"rotary needs rows of at least {heads} contiguous heads of an even head_dim up to "
                             f"{MAX_ROTARY_HEAD_DIM}, and contiguous cos and sin of [{rows}, {head_dim}]")
        self._rotary(x.data_ptr(), x.stride(0), rows, heads, head_dim, cos.data_ptr(), signed_sin.data_ptr(),
                     torch.get_num_threads())
