"""The compiled paged decode-attention kernel (engine/native_kernels.py): against a float64 reference, its
independence from batch and thread count, and the engine's choice of it and fallback without it."""
from __future__ import annotations

import os
import stat

import pytest
import torch

from engine import native_kernels
from engine.errors import InvalidRequestError
from engine.native_kernels import NativeBuildError, paged_decode_attention
from engine.sampling_params import SamplingParams
from tiny_models import TEST_DEVICE, prompt_of

cpu_only = pytest.mark.skipif(TEST_DEVICE != "cpu", reason="the native kernel serves CPU decodes")


def _kernel(dtype: torch.dtype, head_dim: int):
    try:
        return paged_decode_attention(dtype, head_dim)
    except NativeBuildError as e:  # a machine with no C compiler: the engine keeps PyTorch's path
        pytest.skip(f"native kernel unavailable here: {e}")


def _case(dtype, head_dim, heads, kv_heads, block_size, lens, seed=0, num_blocks=None):
    """A pool with each sequence's blocks scattered through it, everything unused set to NaN (so a read
    of a padded block or of a slot past a sequence's length poisons its output), and queries whose rows
    lie apart in a wider tensor, as the model's fused projection leaves them."""
    g = torch.Generator().manual_seed(seed)
    widths = [-(-n // block_size) for n in lens]
    num_blocks = num_blocks or sum(widths) + 7
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables = []
    for w in widths:
        tables.append(order[:w])
        order = order[w:]
    width = max(widths)
    slots = num_blocks * block_size
    keys = torch.full((kv_heads, slots, head_dim), float("nan"))
    values = torch.full((kv_heads, slots, head_dim), float("nan"))
    for table, n in zip(tables, lens):
        for pos in range(n):
            slot = table[pos // block_size] * block_size + pos % block_size
            keys[:, slot] = torch.randn(kv_heads, head_dim, generator=g) * 2
            values[:, slot] = torch.randn(kv_heads, head_dim, generator=g)
    wide = torch.randn(len(lens), heads + 2 * kv_heads, head_dim, generator=g) * 2
    q = wide.to(dtype)[:, :heads]  # rows (heads + 2 * kv_heads) * head_dim apart
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    return q, keys.to(dtype), values.to(dtype), tables, padded, torch.tensor(lens, dtype=torch.int32)


def _reference(q, keys, values, tables, lens, block_size):
    """float64 attention of each sequence's query over its first lens[i] positions."""
    b, heads, d = q.shape
    group = heads // keys.shape[0]
    out = torch.empty(b, heads, d, dtype=torch.float64)
    for i, (table, n) in enumerate(zip(tables, lens.tolist())):
        slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(n)])
        for h in range(heads):
            k = keys[h // group, slots].double()
            v = values[h // group, slots].double()
            out[i, h] = torch.softmax(k @ q[i, h].double() * d ** -0.5, 0) @ v
    return out.view(b, heads * d)


@cpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim,heads,kv_heads,block_size", [
    (64, 9, 3, 16),    # SmolLM2's heads
    (16, 4, 2, 8),     # the tiny test models'
    (32, 8, 8, 5),     # no grouping, a block size that is not a power of two
    (128, 8, 1, 16),   # one KV head for eight query heads
])
def test_matches_a_float64_reference(dtype, head_dim, heads, kv_heads, block_size):
    kernel = _kernel(dtype, head_dim)
    # Lengths on both sides of the 16-key chunks and of the blocks, one key alone, and a long context.
    lens = [1, 2, 15, 16, 17, 31, 33, block_size, block_size + 1, 300]
    q, keys, values, tables, padded, lens_t = _case(dtype, head_dim, heads, kv_heads, block_size, lens)
    got = kernel(q, keys, values, padded, lens_t, block_size, head_dim ** -0.5)
    assert got.dtype == dtype and got.shape == (len(lens), heads * head_dim)
    want = _reference(q, keys, values, tables, lens_t, block_size)
    assert torch.isfinite(got).all(), "a padded block or a slot past a length was read"
    error = (got.double() - want).abs().max().item()
    if dtype == torch.float32:
        assert error < 1e-5
    else:
        # Rounding the reference itself to bfloat16 costs up to 2^-9 of a value (0.0074-0.0078 here); the
        # kernel, which also rounds its probabilities to bfloat16 as PyTorch's path does, measured within
        # 1.1 times that.
        rounding = (want.to(dtype).double() - want).abs().max().item()
        assert error < 1.5 * rounding, (error, rounding)


@cpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_sequence_gets_the_same_bits_alone_in_any_batch_and_on_any_number_of_threads(dtype):
    kernel = _kernel(dtype, 64)
    lens = [40, 7, 129, 64, 1, 250]
    q, keys, values, _, padded, lens_t = _case(dtype, 64, 9, 3, 16, lens, seed=3)
    batched = kernel(q, keys, values, padded, lens_t, 16, 0.125)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = kernel(q, keys, values, padded, lens_t, 16, 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(batched, one_thread)
    for i in range(len(lens)):
        # Alone, with its table cut to its own width.
        width = -(-lens[i] // 16)
        alone = kernel(q[i:i + 1], keys, values, padded[i:i + 1, :width].contiguous(), lens_t[i:i + 1], 16, 0.125)
        assert torch.equal(alone[0], batched[i]), f"sequence {i} changed with its batch"


@cpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_writes_the_new_keys_and_values_it_is_given_before_reading_them(dtype):
    kernel = _kernel(dtype, 64)
    lens = [1, 17, 40, 300]
    q, keys, values, tables, padded, lens_t = _case(dtype, 64, 9, 3, 16, lens, seed=5)
    written = kernel(q, keys, values, padded, lens_t, 16, 0.125)
    # Each sequence's last position, as the model hands it over: rows of a wider tensor, the pool's copy
    # poisoned until the kernel writes it.
    slots = torch.tensor([t[(n - 1) // 16] * 16 + (n - 1) % 16 for t, n in zip(tables, lens)])
    wide = torch.zeros(len(lens), 2, 3 + 5, 64, dtype=dtype)
    new_keys, new_values = wide[:, 0, 2:5], wide[:, 1, 1:4]
    new_keys.copy_(keys[:, slots].transpose(0, 1))
    new_values.copy_(values[:, slots].transpose(0, 1))
    keys[:, slots] = float("nan")
    values[:, slots] = float("nan")
    got = kernel(q, keys, values, padded, lens_t, 16, 0.125, new_keys, new_values, slots)
    assert torch.equal(got, written)
    assert torch.equal(keys[:, slots].transpose(0, 1), new_keys)
    assert torch.equal(values[:, slots].transpose(0, 1), new_values)


@cpu_only
def test_refuses_tensors_it_was_not_built_for():
    kernel = _kernel(torch.float32, 64)
    q, keys, values, _, padded, lens = _case(torch.float32, 64, 4, 2, 8, [5, 9])
    with pytest.raises(ValueError, match="serves"):
        kernel(q.to(torch.bfloat16), keys.to(torch.bfloat16), values.to(torch.bfloat16), padded, lens, 8, 0.125)
    with pytest.raises(ValueError, match="serves"):
        kernel(q, keys, values, padded.long(), lens, 8, 0.125)
    with pytest.raises(ValueError, match="contiguous"):
        kernel(q, keys.transpose(0, 1), values, padded, lens, 8, 0.125)
    assert not native_kernels.PagedDecodeAttention.supports(torch.float32, 36, 4, 64)   # 9 per KV head
    assert not native_kernels.PagedDecodeAttention.supports(torch.float32, 4, 2, 24)    # not a multiple of 16
    with pytest.raises(NativeBuildError, match="heads of 24"):
        paged_decode_attention(torch.float32, 24)


@cpu_only
def test_built_once_then_loaded_from_the_cache(tmp_path, monkeypatch):
    if native_kernels._compiler() is None:
        pytest.skip("no C compiler here")
    monkeypatch.setattr(native_kernels, "_loaded", {})
    first = paged_decode_attention(torch.float32, 16, cache_dir=tmp_path)
    built = first.path.stat().st_mtime_ns
    assert [p.name for p in tmp_path.iterdir()] == [first.path.name]  # no temporary file left behind
    monkeypatch.setattr(native_kernels, "_loaded", {})  # a new process: the library is on disk already
    assert paged_decode_attention(torch.float32, 16, cache_dir=tmp_path).path == first.path
    assert first.path.stat().st_mtime_ns == built


@cpu_only
def test_a_failing_compiler_is_reported_and_remembered(tmp_path, monkeypatch):
    broken = tmp_path / "broken-cc"
    broken.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo broken 1.0; exit 0; fi\n"
                      "echo 'error: no such thing' >&2\nexit 3\n")
    broken.chmod(broken.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CC", str(broken))
    monkeypatch.setattr(native_kernels, "_loaded", {})
    with pytest.raises(NativeBuildError, match="failed \\(3\\): error: no such thing"):
        paged_decode_attention(torch.float32, 16, cache_dir=tmp_path / "cache")
    monkeypatch.delenv("CC")
    # Remembered for the process: not compiled again on every engine start.
    with pytest.raises(NativeBuildError, match="no such thing"):
        paged_decode_attention(torch.float32, 16, cache_dir=tmp_path / "cache")
    assert not any(p.suffix == ".so" for p in (tmp_path / "cache").iterdir())


def _churn(engine):
    """Decodes that join and leave the batch at many steps: a cap of three running requests, prompts and
    output lengths all different, prefills chunked by a small budget."""
    prompts = [prompt_of(n, seed=60 + i) for i, n in enumerate([3, 11, 6, 25, 14, 9, 2])]
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in [30, 7, 19, 12, 41, 5, 23]]
    streams = [engine.submit(p, sp) for p, sp in zip(prompts, params)]
    return [s.final().token_ids for s in streams]


@cpu_only
def test_engine_uses_the_kernel_on_the_cpu_and_agrees_with_pytorchs_path(tiny):
    _kernel(torch.float32, tiny.config.head_dim)
    settings = dict(max_num_seqs=3, max_num_batched_tokens=8)
    with tiny.engine(**settings) as engine:
        assert engine.runner.model.backend.native is not None and engine.runner.mirror is None
        native = _churn(engine)
    with tiny.engine(native_decode="off", **settings) as engine:
        assert engine.runner.model.backend.native is None and engine.runner.mirror is not None
        assert _churn(engine) == native
    with tiny.engine(native_decode="off", decode_mirror_bytes=0, **settings) as engine:
        assert _churn(engine) == native
    # The mirror asked for explicitly wins over "auto"; "on" and a mirror together are refused.
    with tiny.engine(decode_mirror_bytes=1 << 24) as engine:
        assert engine.runner.model.backend.native is None and engine.runner.mirror is not None
    with pytest.raises(InvalidRequestError, match="excludes the decode mirror"):
        tiny.engine(native_decode="on", decode_mirror_bytes=1 << 24)
    with pytest.raises(InvalidRequestError, match="native_decode must be"):
        tiny.engine(native_decode="yes")


@cpu_only
def test_engine_falls_back_without_a_compiler(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no cc, gcc or clang to be found
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(native_kernels, "_loaded", {})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # nothing built before either
    with tiny.engine() as engine:
        assert engine.runner.model.backend.native is None and engine.runner.mirror is not None
        with_fallback = _churn(engine)
    with pytest.raises(InvalidRequestError, match="no C compiler"):
        tiny.engine(native_decode="on")
    monkeypatch.setenv("PATH", os.defpath)
    monkeypatch.setattr(native_kernels, "_loaded", {})
    monkeypatch.delenv("XDG_CACHE_HOME")
    with tiny.engine() as engine:
        assert with_fallback == _churn(engine)


@cpu_only
def test_on_refuses_a_model_it_has_no_kernel_for(tiny):
    from tiny_models import build_tiny_model
    odd = build_tiny_model(hidden_size=48, num_attention_heads=2, num_key_value_heads=2)  # heads of 24
    with pytest.raises(InvalidRequestError, match="head size 24"):
        odd.engine(native_decode="on")
    with odd.engine() as engine:  # "auto" keeps PyTorch's path
        assert engine.runner.model.backend.native is None
