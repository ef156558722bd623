"""The reader against gguf-py: the real file, a synthetic file with every value type, bad files."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from pyserve.loader.gguf_reader import read_gguf
from pyserve.loader.gguf_types import BLOCK_LAYOUT, GGUFError

gguf = pytest.importorskip("gguf")


def _reference_metadata(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _assert_metadata_equal(ours: dict, ref: dict) -> None:
    assert list(ours) == list(ref)
    for key, want in ref.items():
        got = ours[key]
        if isinstance(want, float):
            assert got == pytest.approx(want, rel=0, abs=0), key
        else:
            assert got == want, key


def test_block_layouts_match_gguf_py():
    for qtype, (block, size) in gguf.GGML_QUANT_SIZES.items():
        if qtype.name == "Q8_1":
            continue  # gguf-py says 40 bytes (f32 d, s); ggml's block_q8_1 is 36 (f16). Never stored in files.
        assert BLOCK_LAYOUT[int(qtype)] == (block, size), qtype.name


@pytest.mark.slow
def test_real_file_matches_gguf_py(smollm_path, gguf_py_reader):
    r = gguf_py_reader
    with read_gguf(smollm_path) as f:
        assert f.version == 3
        assert f.alignment == r.alignment
        assert f.data_offset == r.data_offset
        _assert_metadata_equal(f.metadata, _reference_metadata(r))
        assert len(f.metadata["tokenizer.ggml.tokens"]) == 49152
        assert [t.name for t in r.tensors] == list(f.tensors)
        for t in r.tensors:
            info = f.tensors[t.name]
            assert info.shape == tuple(int(d) for d in reversed(t.shape)), t.name
            assert info.ggml_type == int(t.tensor_type)
            assert info.offset == t.data_offset
            assert info.n_elements == t.n_elements
            assert info.n_bytes == t.n_bytes
            raw = f.raw(t.name)
            assert raw.shape == t.data.view(np.uint8).reshape(raw.shape).shape
            assert np.array_equal(raw.reshape(-1), t.data.view(np.uint8).reshape(-1)), t.name


EVERY_TYPE = {
    "t.u8": (200, "add_uint8"),
    "t.i8": (-100, "add_int8"),
    "t.u16": (60000, "add_uint16"),
    "t.i16": (-30000, "add_int16"),
    "t.u32": (4_000_000_000, "add_uint32"),
    "t.i32": (-2_000_000_000, "add_int32"),
    "t.f32": (1.5, "add_float32"),
    "t.bool": (True, "add_bool"),
    "t.str": ("héllo ✓ 😀", "add_string"),
    "t.u64": (2**63 + 5, "add_uint64"),
    "t.i64": (-(2**62), "add_int64"),
    "t.f64": (3.141592653589793, "add_float64"),
}


def _write_synthetic(path, alignment: int | None = None) -> dict[str, np.ndarray]:
    w = gguf.GGUFWriter(str(path), arch="test")
    if alignment:
        w.add_custom_alignment(alignment)
    for key, (value, method) in EVERY_TYPE.items():
        getattr(w, method)(key, value)
    V = gguf.GGUFValueType
    for vt, values in [
        (V.UINT8, [1, 2, 255]), (V.INT8, [-1, 5]), (V.UINT16, [1, 65535]), (V.INT16, [-5, 7]),
        (V.UINT32, [7, 8, 9]), (V.INT32, [-3, 3]), (V.FLOAT32, [0.5, -2.25]), (V.BOOL, [True, False, True]),
        (V.UINT64, [2**40]), (V.INT64, [-(2**40)]), (V.FLOAT64, [1e300, -1e-300]),
        (V.STRING, ["a", "", "ü\n", "😀 emoji", "x" * 300]),
    ]:
        w.add_key_value(f"arr.{vt.name.lower()}", values, V.ARRAY, sub_type=vt)
    w.add_key_value("arr.nested", [[1, 2], [3]], V.ARRAY, sub_type=V.ARRAY)
    rng = np.random.default_rng(0)
    tensors = {
        "f32": rng.standard_normal((3, 5)).astype(np.float32),
        "f16": rng.standard_normal((4,)).astype(np.float16),
        "q8": gguf.quants.quantize(rng.standard_normal((2, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0),
        "f32_3d": rng.standard_normal((2, 3, 4)).astype(np.float32),
    }
    for name, arr in tensors.items():
        if name == "q8":
            w.add_tensor(name, arr, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


@pytest.mark.parametrize("alignment", [None, 64])
def test_synthetic_file_every_type(tmp_path, alignment):
    path = tmp_path / "t.gguf"
    tensors = _write_synthetic(path, alignment)
    r = gguf.GGUFReader(str(path))
    with read_gguf(path) as f:
        assert f.alignment == (alignment or 32)
        assert f.data_offset == r.data_offset
        for key, (value, _) in EVERY_TYPE.items():
            assert f.metadata[key] == value, key
        assert f.metadata["arr.string"] == ["a", "", "ü\n", "😀 emoji", "x" * 300]
        assert f.metadata["arr.bool"] == [True, False, True]
        assert f.metadata["arr.nested"] == [[1, 2], [3]]
        ref = _reference_metadata(r)
        ref.pop("arr.nested")  # gguf-py's contents() does not unpack nested arrays
        _assert_metadata_equal({k: v for k, v in f.metadata.items() if k != "arr.nested"}, ref)
        assert f.tensors["f32"].shape == (3, 5)
        assert f.tensors["f32_3d"].shape == (2, 3, 4)
        assert f.tensors["q8"].shape == (2, 64)
        assert np.array_equal(f.raw("f32").view(np.float32), tensors["f32"])
        assert np.array_equal(f.raw("f16").view(np.float16), tensors["f16"])
        assert np.array_equal(f.raw("f32_3d").view(np.float32), tensors["f32_3d"])
        assert np.array_equal(f.raw("q8"), tensors["q8"])
        for t in r.tensors:
            assert f.tensors[t.name].offset == t.data_offset


def test_string_array_with_nul_falls_back(tmp_path):
    path = tmp_path / "nul.gguf"
    w = gguf.GGUFWriter(str(path), arch="test")
    w.add_key_value("s", ["a\0b", "c", "\0"], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.STRING)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with read_gguf(path) as f:
        assert f.metadata["s"] == ["a\0b", "c", "\0"]


def _one_line_error(path, match: str) -> None:
    with pytest.raises(GGUFError) as e:
        read_gguf(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and match in msg, msg


def test_truncated_files(tmp_path, smollm_path):
    data = open(smollm_path, "rb").read(2_000_000)
    # Cut in the header, in the middle of the vocab, in the tensor infos, and in the tensor data.
    for cut in (3, 10, 20, 500_000, 1_780_000, 1_900_000):
        p = tmp_path / f"cut{cut}.gguf"
        p.write_bytes(data[:cut])
        with pytest.raises(GGUFError) as e:
            read_gguf(p)
        msg = str(e.value)
        assert "\n" not in msg and str(p) in msg, msg
        assert "truncated" in msg or "not a GGUF" in msg, msg


def test_corrupt_files(tmp_path):
    p = tmp_path / "bad.gguf"
    p.write_bytes(b"")
    _one_line_error(p, "empty")
    p.write_bytes(b"GGML" + b"\0" * 100)
    _one_line_error(p, "not a GGUF file")
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", 1, 0, 0))
    _one_line_error(p, "version 1")
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 2**40, 0))
    _one_line_error(p, "corrupt header")
    key = b"k"
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + key + struct.pack("<I", 99))
    _one_line_error(p, "unknown value type 99")
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + key + struct.pack("<IQ", 8, 2**50))
    _one_line_error(p, "truncated")
    tensor = struct.pack("<Q", 1) + b"w" + struct.pack("<IQIQ", 1, 32, 77, 0)
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + tensor + b"\0" * 64)
    _one_line_error(p, "unknown ggml type 77")
    _one_line_error(tmp_path / "missing.gguf", "cannot open")
