import hashlib

import numpy as np
import pytest

from library import model_hashes
from library.model_hashes import (
    base_model_hashes,
    legacy_hash_of_bytes,
    precalculate_lora_hashes,
    sha256_of_tensor_data,
)
from library.safetensors_io import serialize_safetensors

SHA256_OF_NOTHING = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_legacy_hash_reads_64_kib_at_1_mib():
    window = bytes(range(256)) * 256  # 0x10000 bytes
    data = b"\xaa" * 0x100000 + window + b"\xbb" * 1000
    assert legacy_hash_of_bytes(data) == hashlib.sha256(window).hexdigest()[:8]


def test_legacy_hash_of_a_small_file_is_the_hash_of_nothing():
    assert legacy_hash_of_bytes(b"x" * 1000) == SHA256_OF_NOTHING[:8] == "e3b0c442"


def test_tensor_data_hash_skips_length_and_header():
    header = b'{"a":1}'
    payload = b"tensor bytes"
    serialized = len(header).to_bytes(8, "little") + header + payload
    assert sha256_of_tensor_data(serialized) == hashlib.sha256(payload).hexdigest()


def test_base_model_hashes_match_whole_file_sha256(tmp_path, monkeypatch):
    content = np.random.default_rng(1).bytes(0x100000 + 0x10000 + 12345)
    checkpoint = tmp_path / "sdxl.safetensors"
    checkpoint.write_bytes(content)
    expected = (
        hashlib.sha256(content[0x100000:0x110000]).hexdigest()[:8],
        hashlib.sha256(content).hexdigest(),
    )
    assert base_model_hashes(checkpoint) == expected
    # Chunk boundaries must not matter: an odd chunk size gives the same answer.
    monkeypatch.setattr(model_hashes, "_READ_CHUNK", 4099)
    assert base_model_hashes(checkpoint) == expected


def test_base_model_hashes_of_small_file(tmp_path):
    checkpoint = tmp_path / "tiny.safetensors"
    checkpoint.write_bytes(b"")
    assert base_model_hashes(checkpoint) == ("e3b0c442", SHA256_OF_NOTHING)


def test_diffusers_folder_gets_sd_scripts_placeholder(tmp_path):
    assert base_model_hashes(tmp_path) == ("IsADirectory", "IsADirectory")


def lora_tensors():
    rng = np.random.default_rng(2)
    return {
        "lora_unet_a.lora_down.weight": rng.standard_normal((8, 640)).astype(np.float16),
        "lora_unet_a.lora_up.weight": rng.standard_normal((1280, 640)).astype(np.float16),
        "lora_unet_a.alpha": np.array(4.0, dtype=np.float16),
    }


def test_only_ss_entries_take_part_in_lora_hashes():
    tensors = lora_tensors()
    training = {"ss_network_dim": "8", "ss_output_name": "my_lora"}
    with_other_keys = {**training, "modelspec.title": "a long title " * 50, "sshs_model_hash": "stale"}
    assert precalculate_lora_hashes(tensors, with_other_keys) == precalculate_lora_hashes(tensors, training)


def test_lora_hashes_against_serialized_bytes():
    tensors = lora_tensors()
    metadata = {"ss_network_dim": "8", "ss_output_name": "my_lora"}
    serialized = serialize_safetensors(tensors, metadata)
    assert len(serialized) > 0x110000  # the legacy window lies inside the tensor data
    header_end = 8 + int.from_bytes(serialized[:8], "little")
    assert precalculate_lora_hashes(tensors, metadata) == (
        hashlib.sha256(serialized[header_end:]).hexdigest(),
        hashlib.sha256(serialized[0x100000:0x110000]).hexdigest()[:8],
    )


def test_legacy_hash_moves_with_header_length_but_model_hash_does_not():
    tensors = lora_tensors()
    short = precalculate_lora_hashes(tensors, {"ss_output_name": "a"})
    longer = precalculate_lora_hashes(tensors, {"ss_output_name": "a" * 64})
    assert short[0] == longer[0]
    assert short[1] != longer[1]


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_model_hash_follows_the_tensor_values(dtype):
    tensors = {name: array.astype(dtype) for name, array in lora_tensors().items()}
    changed = dict(tensors)
    changed["lora_unet_a.alpha"] = np.array(8.0, dtype=dtype)
    assert precalculate_lora_hashes(tensors, {})[0] != precalculate_lora_hashes(changed, {})[0]
