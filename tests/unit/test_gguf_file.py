"""GGUFFile against the gguf package's own reader, on a file the gguf writer made."""

from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest

from tokenloom.gguf_file import GGUFFile

QType = gguf.GGMLQuantizationType


@pytest.fixture
def gguf_path(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "all.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_uint8("t.u8", 200)
    writer.add_int8("t.i8", -100)
    writer.add_uint16("t.u16", 60000)
    writer.add_int16("t.i16", -30000)
    writer.add_uint32("t.u32", 4_000_000_000)
    writer.add_int32("t.i32", -2_000_000_000)
    writer.add_uint64("t.u64", 2**63 + 5)
    writer.add_int64("t.i64", -(2**62))
    writer.add_float32("t.f32", 0.15625)
    writer.add_float64("t.f64", 1e-300)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "h\u00e9llo \u2581world")
    writer.add_string("t.empty", "")
    writer.add_array("t.strs", ["a", "", "\u00e9\u00e9", "<0x0A>"] * 50)
    writer.add_array("t.ints", list(range(-5, 300)))
    writer.add_array("t.floats", [0.5, -2.25, 1e10])
    writer.add_tensor("f32", rng.standard_normal((3, 64)).astype(np.float32))
    writer.add_tensor("f16", rng.standard_normal((2, 5, 32)).astype(np.float16))
    writer.add_tensor("vec", rng.standard_normal(7).astype(np.float32))
    weights = rng.standard_normal((4, 96)).astype(np.float32)
    for qtype in (QType.Q4_1, QType.Q8_0, QType.Q4_0):
        writer.add_tensor(qtype.name, gguf.quants.quantize(weights, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_fields_match_the_gguf_reader(gguf_path):
    reference = gguf.GGUFReader(gguf_path)
    file = GGUFFile(gguf_path)
    expected = {key: field.contents() for key, field in reference.fields.items()
                if not key.startswith("GGUF.")}
    assert list(file.fields) == list(expected)
    assert file.fields == expected
    assert file.fields["t.u64"] == 2**63 + 5
    assert file.fields["t.str"] == "h\u00e9llo \u2581world"
    assert file.fields["t.strs"][:4] == ["a", "", "\u00e9\u00e9", "<0x0A>"]
    assert file.fields["general.architecture"] == "llama"


def test_tensors_match_the_gguf_reader(gguf_path):
    reference = gguf.GGUFReader(gguf_path)
    file = GGUFFile(gguf_path)
    assert [t.name for t in file.tensors] == [t.name for t in reference.tensors]
    for ours, theirs in zip(file.tensors, reference.tensors):
        assert ours.tensor_type == theirs.tensor_type
        assert ours.shape == tuple(int(n) for n in reversed(theirs.shape))
        assert np.array_equal(ours.data.reshape(-1).view(np.uint8),
                              np.asarray(theirs.data).reshape(-1).view(np.uint8))
    assert file.tensor("f16").shape == (2, 5, 32) and file.tensor("f16").data.dtype == np.float16
    assert file.tensor("vec").shape == (7,)
    q41 = file.tensor("Q4_1")
    assert q41.shape == (4, 96) and q41.data.dtype == np.uint8
    assert q41.data.shape == (4, 3 * 20)  # three 32-value blocks of 20 bytes per row
    assert file.tensor("missing") is None


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"GGML" + bytes(100))
    with pytest.raises(ValueError, match="no GGUF magic"):
        GGUFFile(path)
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        GGUFFile(path)


def test_unsupported_versions(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 1, 0, 0))
    with pytest.raises(ValueError, match="version 1 is not supported"):
        GGUFFile(path)
    path.write_bytes(b"GGUF" + struct.pack(">IQQ", 3, 0, 0))
    with pytest.raises(ValueError, match="big-endian"):
        GGUFFile(path)


@pytest.mark.parametrize("cut", ["header", "string array", "last tensor"])
def test_truncated_files_fail_clearly(gguf_path, tmp_path, cut):
    data = gguf_path.read_bytes()
    keep = {"header": 30, "string array": data.index(b"t.strs") + 100, "last tensor": -100}[cut]
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:keep])
    with pytest.raises(ValueError, match="truncated"):
        GGUFFile(path)


def test_unknown_value_type(tmp_path):
    path = tmp_path / "x.gguf"
    key = b"odd.key"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key
                     + struct.pack("<I", 99))
    with pytest.raises(ValueError, match="'odd.key' has an unknown value type 99"):
        GGUFFile(path)
