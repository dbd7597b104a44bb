import json
import os

import ml_dtypes
import numpy as np
import pytest

from library.errors import UserError
from library.safetensors_io import (
    open_safetensors,
    read_metadata,
    refuse_pickle,
    save_safetensors,
    to_bfloat16,
    to_float32,
)


def parse_header(path):
    """Minimal independent reader: 8-byte little-endian length, then the JSON header."""
    with open(path, "rb") as file:
        length = int.from_bytes(file.read(8), "little")
        return json.loads(file.read(length))


def sample_tensors():
    rng = np.random.default_rng(0)
    return {
        "weight_f32": rng.standard_normal((3, 5)).astype(np.float32),
        "weight_f16": rng.standard_normal((4, 2)).astype(np.float16),
        # Values chosen to be exact in bfloat16 (8 significant bits).
        "weight_bf16": np.array([[1.5, -2.0, 3.140625], [0.0, 65280.0, -0.0078125]], dtype=ml_dtypes.bfloat16),
        "alpha": np.array(4.0, dtype=np.float16),
    }


def test_round_trip_keeps_values_shapes_dtypes_and_metadata(tmp_path):
    path = tmp_path / "lora.safetensors"
    tensors = sample_tensors()
    save_safetensors(tensors, path, {"ss_network_dim": "8", "note": "日本語"})

    header = parse_header(path)
    assert header["__metadata__"] == {"ss_network_dim": "8", "note": "日本語"}
    assert {name: header[name]["dtype"] for name in tensors} == {
        "weight_f32": "F32",
        "weight_f16": "F16",
        "weight_bf16": "BF16",
        "alpha": "F16",
    }
    assert header["alpha"]["shape"] == []

    with open_safetensors(path) as reader:
        assert sorted(reader.keys()) == sorted(tensors)
        assert reader.metadata == {"ss_network_dim": "8", "note": "日本語"}
        assert reader.dtype("weight_bf16") == "BF16"
        assert reader.shape("weight_f32") == (3, 5)
        assert reader.shape("alpha") == ()
        for name, original in tensors.items():
            loaded = reader.read(name)
            assert loaded.dtype == original.dtype
            assert loaded.shape == original.shape
            assert loaded.tobytes() == original.tobytes()
        np.testing.assert_array_equal(
            reader.read_float32("weight_bf16"),
            np.array([[1.5, -2.0, 3.140625], [0.0, 65280.0, -0.0078125]], dtype=np.float32),
        )
        assert reader.read_float32("alpha").dtype == np.float32


def test_bfloat16_bits_on_disk_are_the_top_half_of_float32(tmp_path):
    path = tmp_path / "bf16.safetensors"
    save_safetensors({"x": to_bfloat16(np.array([1.0, -2.0], dtype=np.float32))}, path)
    raw = path.read_bytes()
    data = raw[8 + int.from_bytes(raw[:8], "little") :]
    # float32 1.0 = 0x3F800000, -2.0 = 0xC0000000; bfloat16 keeps the high 16 bits, little-endian.
    assert data == bytes([0x80, 0x3F, 0x00, 0xC0])


def test_strided_views_are_written_in_logical_order(tmp_path):
    path = tmp_path / "t.safetensors"
    transposed = np.arange(6, dtype=np.float32).reshape(3, 2).T
    save_safetensors({"t": transposed}, path)
    with open_safetensors(path) as reader:
        np.testing.assert_array_equal(reader.read("t"), [[0, 2, 4], [1, 3, 5]])


def test_saved_file_gets_ordinary_permissions(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    path = tmp_path / "lora.safetensors"
    save_safetensors({"x": np.zeros(2, np.float32)}, path)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_no_metadata_reads_back_as_empty_dict(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_safetensors({"x": np.zeros(2, np.float32)}, path, None)
    assert read_metadata(path) == {}


def leftover_temp_files(folder):
    return [name for name in os.listdir(folder) if name != "lora.safetensors"]


def test_failed_serialization_keeps_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_safetensors({"x": np.ones(3, np.float32)}, path, {"version": "old"})
    before = path.read_bytes()

    unserializable = {"x": np.ones(3, np.float32), "bad": np.array(["text"], dtype=object)}
    with pytest.raises(Exception):
        save_safetensors(unserializable, path, {"version": "new"})

    assert path.read_bytes() == before
    assert leftover_temp_files(tmp_path) == []


def test_failed_rename_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "lora.safetensors"
    save_safetensors({"x": np.ones(3, np.float32)}, path, {"version": "old"})
    before = path.read_bytes()

    def failing_replace(source, destination):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        save_safetensors({"x": np.zeros(3, np.float32)}, path, {"version": "new"})
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert read_metadata(path) == {"version": "old"}
    assert leftover_temp_files(tmp_path) == []


def test_save_makes_the_missing_output_folder(tmp_path):
    path = tmp_path / "new" / "deeper" / "lora.safetensors"
    save_safetensors({"x": np.arange(3, dtype=np.float32)}, path, {"version": "1"})
    assert read_metadata(path) == {"version": "1"}
    assert leftover_temp_files(path.parent) == []


def test_save_replaces_existing_file(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_safetensors({"x": np.ones(3, np.float32)}, path, {"version": "old"})
    save_safetensors({"y": np.zeros(2, np.float16)}, path, {"version": "new"})
    assert read_metadata(path) == {"version": "new"}
    assert leftover_temp_files(tmp_path) == []


@pytest.mark.parametrize("cut", [-7, 40, 5, 0])
def test_truncated_file_is_a_user_error_naming_the_file(tmp_path, cut):
    path = tmp_path / "lora.safetensors"
    save_safetensors({"x": np.ones(100, np.float32)}, path, {"k": "v"})
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(UserError, match="is not a valid safetensors file") as error:
        open_safetensors(path)
    assert str(path) in str(error.value)
    assert "\n" not in str(error.value)


def test_non_safetensors_file_is_a_user_error(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("this is a text file, not tensors")
    with pytest.raises(UserError, match="not a valid safetensors file"):
        read_metadata(path)


def test_missing_file_and_directory_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        open_safetensors(tmp_path / "absent.safetensors")
    with pytest.raises(UserError, match="is a directory"):
        open_safetensors(tmp_path)


def test_to_float32_upcasts_half_precisions_exactly():
    half = np.array([0.5, -1.25, 2048.0], dtype=np.float16)
    assert to_float32(half).dtype == np.float32
    np.testing.assert_array_equal(to_float32(half), [0.5, -1.25, 2048.0])
    brain = np.array([0.5, -1.25, 2048.0], dtype=ml_dtypes.bfloat16)
    np.testing.assert_array_equal(to_float32(brain), [0.5, -1.25, 2048.0])


@pytest.mark.parametrize("name", ["model.ckpt", "model.PT", "weights.pth", "pytorch_model.bin"])
def test_pickle_checkpoints_are_refused(name):
    with pytest.raises(UserError, match="convert it to .safetensors") as error:
        refuse_pickle(f"/models/{name}")
    assert f"/models/{name}" in str(error.value)


def test_safetensors_is_never_refused():
    refuse_pickle("/models/sdxl.safetensors")


def test_streaming_writer_matches_in_memory_writer(tmp_path):
    import ml_dtypes

    from library.safetensors_io import save_safetensors_streaming

    rng = np.random.default_rng(0)
    tensors = {
        "b.weight": rng.standard_normal((3, 5)).astype(np.float16),
        "a.bias": rng.standard_normal(7).astype(np.float32),
        "c": rng.standard_normal((2, 2, 3)).astype(ml_dtypes.bfloat16),
        "alpha": np.array(4.0, np.float16),
    }
    streamed = tmp_path / "streamed.safetensors"
    save_safetensors_streaming(
        [(name, value.shape, value.dtype, lambda value=value: value) for name, value in tensors.items()],
        streamed, {"k": "v"})
    with open_safetensors(streamed) as reader:
        assert reader.metadata == {"k": "v"}
        assert sorted(reader.keys()) == sorted(tensors)
        for name, value in tensors.items():
            assert reader.read(name).dtype == value.dtype
            np.testing.assert_array_equal(reader.read(name), value)


def test_streaming_writer_leaves_nothing_when_a_tensor_fails(tmp_path):
    from library.safetensors_io import save_safetensors_streaming

    target = tmp_path / "model.safetensors"

    def broken():
        raise RuntimeError("producer failed")

    with pytest.raises(RuntimeError):
        save_safetensors_streaming([("x", (2,), np.float32, broken)], target)
    assert list(tmp_path.iterdir()) == []


def test_reads_equal_the_safetensors_library_for_every_dtype(tmp_path):
    import safetensors.numpy

    tensors = dict(sample_tensors(), ids=np.arange(12, dtype=np.int64).reshape(3, 4), mask=np.array([True, False]),
                   empty=np.zeros((0, 3), np.float32), bytes=np.arange(7, dtype=np.uint8))
    path = tmp_path / "all.safetensors"
    save_safetensors(tensors, path)
    expected = safetensors.numpy.load_file(str(path))
    with open_safetensors(path) as reader:
        assert reader.keys() == sorted(expected)
        for name, value in expected.items():
            got = reader.read(name)
            assert got.shape == value.shape and reader.shape(name) == value.shape
            assert got.dtype.itemsize == value.dtype.itemsize and got.dtype.kind == value.dtype.kind
            bits = np.atleast_1d(value).view(np.uint8)
            np.testing.assert_array_equal(np.atleast_1d(got).view(np.uint8), bits, err_msg=name)
            got[...] = 0  # a private, writable copy: the next read is unchanged
            np.testing.assert_array_equal(np.atleast_1d(reader.read(name)).view(np.uint8), bits, err_msg=name)


def test_an_open_reader_maps_no_part_of_the_file(tmp_path):
    """A memory-mapped checkpoint counts in the process's resident memory while open; reads go through pread."""
    path = tmp_path / "big.safetensors"
    save_safetensors({"w": np.ones((256, 1024), np.float32)}, path)
    with open_safetensors(path) as reader:
        reader.read("w")
        with open("/proc/self/maps", encoding="utf-8") as maps:
            assert str(path) not in maps.read()


def test_header_offsets_beyond_the_file_are_a_user_error(tmp_path):
    path = tmp_path / "lying.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)
    with pytest.raises(UserError, match="'w' at bytes 0-16 does not fit"):
        open_safetensors(path)
