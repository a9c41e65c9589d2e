"""engine/gguf_header.py and engine/gguf_dequant.py against gguf-py's own reader and dequantisation, which
they replace on the loading path for speed: the same metadata, tensor directory and float32 values."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.bundled import default_model_path
from engine.errors import ModelLoadError
from engine.gguf_dequant import dequantize
from engine.gguf_header import MAX_METADATA_ARRAY, read_gguf_header

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType


def reader_view(path):
    """What gguf-py reads: metadata (arrays up to MAX_METADATA_ARRAY), array lengths, tensors."""
    reader = gguf.GGUFReader(str(path))
    meta, lengths = {}, {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if f.types and f.types[0] == gguf.GGUFValueType.ARRAY:
            lengths[key] = len(f.data)
            if len(f.data) > MAX_METADATA_ARRAY:
                continue
        meta[key] = f.contents()
    return meta, lengths, reader.tensors


def assert_same_as_reader(path):
    header = read_gguf_header(path)
    meta, lengths, tensors = reader_view(path)
    assert header.metadata == meta
    assert header.array_lengths == lengths
    assert [t.name for t in header.tensors] == [t.name for t in tensors]
    for ours, theirs in zip(header.tensors, tensors):
        assert ours.tensor_type == theirs.tensor_type, ours.name
        assert ours.shape == tuple(int(d) for d in theirs.shape), ours.name
        assert ours.data.dtype == theirs.data.dtype and ours.data.shape == theirs.data.shape, ours.name
        assert np.array_equal(ours.data, theirs.data), ours.name
    return header


def write_sample(path, alignment=None):
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_uint32("t.u32", 7)
    w.add_int32("t.i32", -7)
    w.add_uint64("t.u64", 1 << 40)
    w.add_float32("t.f32", 0.25)
    w.add_float64("t.f64", -1.5)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ✓")
    w.add_array("t.small_strings", ["a", "bc", ""])
    w.add_array("t.small_ints", [1, 2, 3])
    w.add_array("t.big_strings", [f"tok{i}" for i in range(MAX_METADATA_ARRAY + 5)])
    w.add_array("t.big_floats", [float(i) for i in range(MAX_METADATA_ARRAY * 2)])
    values = rng.standard_normal((8, 64)).astype(np.float32)
    w.add_tensor("plain32", values)
    w.add_tensor("plain16", values.astype(np.float16))
    for qtype in (Q.Q8_0, Q.Q4_0, Q.Q4_1):
        w.add_tensor(f"q.{qtype.name}", gguf.quants.quantize(values, qtype), raw_dtype=qtype)
    w.add_tensor("vector", values[0])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("alignment", [None, 64])
def test_header_of_every_value_type_and_tensor_type_is_what_gguf_py_reads(tmp_path, alignment):
    write_sample(tmp_path / "s.gguf", alignment)
    header = assert_same_as_reader(tmp_path / "s.gguf")
    assert "t.big_strings" not in header.metadata and header.array_lengths["t.big_strings"] == MAX_METADATA_ARRAY + 5
    assert header.metadata["t.str"] == "héllo ✓" and header.metadata["t.small_strings"] == ["a", "bc", ""]


def test_bundled_model_header_is_what_gguf_py_reads():
    header = assert_same_as_reader(default_model_path())
    assert header.array_lengths["tokenizer.ggml.tokens"] == 49152


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.F16, Q.F32])
def test_dequantisation_is_gguf_py_s_bit_for_bit(qtype):
    rng = np.random.default_rng(1)
    values = (rng.standard_normal((24, 256)) * rng.uniform(0.01, 10, (24, 1))).astype(np.float32)
    data = gguf.quants.quantize(values, qtype) if qtype not in (Q.F32, Q.F16) else (
        values if qtype == Q.F32 else values.astype(np.float16))
    ours = dequantize(data, qtype)
    theirs = gguf.quants.dequantize(data, qtype)
    assert ours.dtype == torch.float32 and tuple(ours.shape) == theirs.shape
    assert torch.equal(ours, torch.from_numpy(np.array(theirs, dtype=np.float32)))


def test_bundled_model_tensors_dequantise_as_gguf_py_does():
    header = read_gguf_header(default_model_path())
    seen = set()
    for t in header.tensors:  # the first tensor of each type: the embedding is Q8_0, the layers Q4_1
        if t.tensor_type in seen:
            continue
        seen.add(t.tensor_type)
        theirs = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        assert torch.equal(dequantize(t.data, t.tensor_type), theirs), t.name
    assert {Q.Q8_0, Q.Q4_1} <= seen


def test_broken_files_are_clear_load_errors(tmp_path):
    write_sample(tmp_path / "s.gguf")
    whole = (tmp_path / "s.gguf").read_bytes()
    cases = {
        "not GGUF": b"GGML" + whole[4:],
        "version 1": whole[:4] + (1).to_bytes(4, "little") + whole[8:],
        "big-endian": whole[:4] + (3).to_bytes(4, "big") + whole[8:],
        "truncated in metadata": whole[:200],
        "truncated in the big string array": whole[:whole.index(b"tok1000")],
        "truncated in the big float array": whole[:whole.index(b"t.big_floats") + 100],
        "truncated in tensor data": whole[:-100],
    }
    for name, content in cases.items():
        (tmp_path / "bad.gguf").write_bytes(content)
        with pytest.raises(ModelLoadError):
            read_gguf_header(tmp_path / "bad.gguf")
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="not a GGUF file|cannot read"):
        read_gguf_header(tmp_path / "empty.gguf")
