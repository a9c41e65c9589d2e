"""C kernels the engine builds with the machine's own compiler, for the CPU steps PyTorch's ops serve badly.

Two sources, one library per dtype and head size: decode attention straight from the paged KV pool
(engine/native/paged_decode_attention.c) and the small row-wise steps of a layer, RMSNorm, SiLU-and-
multiply and the rotary embedding (engine/native/row_ops.c); their headers say why. They are compiled
once per machine with `cc -O3 -march=native -fopenmp` into the cache directory, keyed by the sources,
the compiler and the CPU, and loaded with ctypes. Where there is no compiler, or the build fails, the
engine keeps its PyTorch path and says so once in the log.

The library links against the OpenMP runtime PyTorch has already loaded (the same libgomp.so.1, which
the loader does not map twice), so the kernel's threads are PyTorch's threads, not a second team
spinning beside them."""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from engine.cache_dir import cache_root
from engine.row_ops import RowOps

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name("native") / name for name in ("paged_decode_attention.c", "row_ops.c")]
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"]
# What the C side has kernels for: the dtypes (and its BF16 switch for each), head sizes (multiples of
# 16 up to MAX_HEAD_DIM; one library per dtype and head size) and query heads per KV head.
DTYPE_SWITCH = {torch.float32: 0, torch.bfloat16: 1}
MAX_HEAD_DIM = 256
MAX_GROUP = 8
COMPILE_TIMEOUT_S = 120


def _has_kernel(dtype: torch.dtype, head_dim: int) -> bool:
    return dtype in DTYPE_SWITCH and head_dim % 16 == 0 and 0 < head_dim <= MAX_HEAD_DIM


class NativeBuildError(RuntimeError):
    """The kernels could not be compiled or loaded here."""


def _compiler() -> str | None:
    # GCC or a compiler that takes its vector extensions and flags (clang lacks __builtin_shuffle).
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and shutil.which(name):
            return name
    return None


def _cpu_fingerprint() -> str:
    """What -march=native compiles for: the CPU's model and feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return os.uname().machine
    lines = [line for line in text.splitlines()
             if line.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part")]
    return "\n".join(sorted(set(lines)))


def _build(compiler: str, cache_dir: Path, dtype: torch.dtype, head_dim: int) -> Path:
    source = b"\0".join(path.read_bytes() for path in SOURCES)
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    flags = [*FLAGS, f"-DHEAD_DIM={head_dim}", f"-DBF16={DTYPE_SWITCH[dtype]}"]
    key = hashlib.sha256(b"\0".join([source, version.encode(), " ".join(flags).encode(),
                                     _cpu_fingerprint().encode()])).hexdigest()[:16]
    target = cache_dir / f"conserve-native-{str(dtype).removeprefix('torch.')}-{head_dim}-{key}.so"
    if target.exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed into place: processes starting together (workers, test
    # runs) never load a half-written library.
    fd, partial = tempfile.mkstemp(suffix=".so", dir=cache_dir)
    os.close(fd)
    try:
        result = subprocess.run([compiler, *flags, "-o", partial, *map(str, SOURCES)], capture_output=True,
                                text=True, timeout=COMPILE_TIMEOUT_S)
        if result.returncode != 0:
            raise NativeBuildError(f"{compiler} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


class PagedDecodeAttention:
    """The compiled kernel for one dtype and head size: decode attention for one layer, reading the pool
    through block tables."""

    def __init__(self, library: Path, dtype: torch.dtype, head_dim: int):
        self.path, self.dtype, self.head_dim = library, dtype, head_dim
        fn = ctypes.CDLL(str(library)).paged_decode_attention
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                       ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_float, ctypes.c_void_p, ctypes.c_int,
                       ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
        self._fn = fn

    @staticmethod
    def supports(dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
        return (_has_kernel(dtype, head_dim) and num_heads % num_kv_heads == 0
                and num_heads // num_kv_heads <= MAX_GROUP)

    def __call__(self, q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, tables: torch.Tensor,
                 lens: torch.Tensor, block_size: int, scale: float, new_keys: torch.Tensor | None = None,
                 new_values: torch.Tensor | None = None, slots: torch.Tensor | None = None) -> torch.Tensor:
        """q [b, heads, d] (its rows may lie any stride apart, its heads must be contiguous); caches
        [kv_heads, slots, d]; tables [b, width] and lens [b], int32: each sequence's blocks and context
        length, its new token included. That token's key and value are either in the caches already, or
        given as new_keys and new_values [b, kv_heads, d] (rows any stride apart) with their int64 cache
        slots [b], and written by the kernel. Returns [b, heads * d]. All on the CPU, q in the caches'
        dtype, the rest contiguous."""
        b, heads, d = q.shape
        kv_heads, num_slots = key_cache.shape[0], key_cache.shape[1]
        if not (q.stride(2) == 1 and q.stride(1) == d and key_cache.is_contiguous() and value_cache.is_contiguous()
                and tables.is_contiguous() and lens.is_contiguous()):
            raise ValueError("paged_decode_attention needs contiguous heads, caches, tables and lengths")
        if tables.dtype != torch.int32 or lens.dtype != torch.int32 or not (
                q.dtype == key_cache.dtype == value_cache.dtype == self.dtype) or d != self.head_dim:
            raise ValueError(f"this paged_decode_attention serves {self.dtype} heads of {self.head_dim} with int32 "
                             f"tables and lengths; got {q.dtype} heads of {d}")
        writes = (0, 0, 0, 0, 0)
        if new_keys is not None:
            for new in (new_keys, new_values):
                if new.shape != (b, kv_heads, d) or new.dtype != self.dtype or new.stride(2) != 1 or new.stride(1) != d:
                    raise ValueError(f"new keys and values must be [{b}, {kv_heads}, {d}] in {self.dtype}, "
                                     f"heads contiguous")
            if slots.dtype != torch.int64 or slots.shape != (b,) or not slots.is_contiguous():
                raise ValueError("slots must be a contiguous int64 tensor, one per sequence")
            writes = (new_keys.data_ptr(), new_keys.stride(0), new_values.data_ptr(), new_values.stride(0),
                      slots.data_ptr())
        out = torch.empty(b, heads * d, dtype=q.dtype)
        rc = self._fn(q.data_ptr(), q.stride(0), key_cache.data_ptr(), value_cache.data_ptr(), num_slots,
                      tables.data_ptr(), tables.shape[1], lens.data_ptr(), b, heads, kv_heads, block_size, scale,
                      out.data_ptr(), torch.get_num_threads(), *writes)
        if rc != 0:
            raise RuntimeError(f"paged_decode_attention failed ({rc}): "
                               + ("no kernel for this group size" if rc == -1 else "out of memory for its scratch"))
        return out


class NativeKernels:
    """One built library's kernels: decode attention and the row-wise ops, for one dtype and head size."""

    def __init__(self, library: Path, dtype: torch.dtype, head_dim: int):
        self.decode_attention = PagedDecodeAttention(library, dtype, head_dim)
        self.row_ops = RowOps(library, dtype)


_lock = threading.Lock()
_loaded: dict[tuple, NativeKernels | NativeBuildError] = {}


def native_kernels(dtype: torch.dtype, head_dim: int, cache_dir: Path | None = None) -> NativeKernels:
    """The kernels for `dtype` and `head_dim` (see PagedDecodeAttention.supports), built on first use (2-5
    s) and then loaded from the cache. Raises NativeBuildError where they cannot be had; the result,
    either way, is remembered for the process."""
    cache_dir = Path(cache_dir) if cache_dir is not None else cache_root() / "native"
    if not _has_kernel(dtype, head_dim):
        raise NativeBuildError(f"no native kernels for {dtype} heads of {head_dim}")
    key = (cache_dir, dtype, head_dim)
    with _lock:
        if key not in _loaded:
            compiler = _compiler()
            try:
                if compiler is None:
                    raise NativeBuildError("no C compiler found (looked for $CC, cc and gcc)")
                _loaded[key] = NativeKernels(_build(compiler, cache_dir, dtype, head_dim), dtype, head_dim)
            except (OSError, subprocess.SubprocessError, NativeBuildError) as e:
                error = e if isinstance(e, NativeBuildError) else NativeBuildError(f"{type(e).__name__}: {e}")
                log.warning("native kernels unavailable, the CPU keeps PyTorch's path: %s", error)
                _loaded[key] = error
        result = _loaded[key]
    if isinstance(result, NativeBuildError):
        raise result
    return result


def paged_decode_attention(dtype: torch.dtype, head_dim: int, cache_dir: Path | None = None) -> PagedDecodeAttention:
    """The decode attention kernel of native_kernels(dtype, head_dim, cache_dir)."""
    return native_kernels(dtype, head_dim, cache_dir).decode_attention
