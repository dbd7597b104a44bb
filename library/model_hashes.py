"""Model hashes exactly as sd-scripts writes them into LoRA metadata.

Two families, both SHA-256 based, that web UIs use to identify models:
- of the base checkpoint file (`ss_sd_model_hash`, `ss_new_sd_model_hash`), as
  stable-diffusion-webui computes them;
- of the LoRA itself (`sshs_model_hash`, `sshs_legacy_hash`), as
  sd-webui-additional-networks computes them, precalculated so the UI need not.
"""

import hashlib
import os

import numpy as np

from library.safetensors_io import serialize_safetensors

LEGACY_HASH_OFFSET = 0x100000
LEGACY_HASH_LENGTH = 0x10000
_READ_CHUNK = 1024 * 1024


def legacy_hash_of_bytes(data: bytes) -> str:
    """First 8 hex digits of SHA-256 over the 64 KiB at offset 1 MiB.

    A file shorter than 1 MiB hashes the empty string ("e3b0c442"), as the originals do.
    """
    window = data[LEGACY_HASH_OFFSET : LEGACY_HASH_OFFSET + LEGACY_HASH_LENGTH]
    return hashlib.sha256(window).hexdigest()[:8]


def sha256_of_tensor_data(serialized: bytes) -> str:
    """SHA-256 of everything after the header of a serialized safetensors file."""
    header_length = int.from_bytes(serialized[:8], "little")
    return hashlib.sha256(memoryview(serialized)[8 + header_length :]).hexdigest()


def precalculate_lora_hashes(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) for a LoRA about to be saved with these tensors.

    Only the `ss_*` training metadata takes part: user-editable keys (modelspec, sshs)
    would otherwise change the legacy hash whenever someone edits them later.
    """
    training_metadata = {key: value for key, value in metadata.items() if key.startswith("ss_")}
    serialized = serialize_safetensors(tensors, training_metadata)
    return sha256_of_tensor_data(serialized), legacy_hash_of_bytes(serialized)


def base_model_hashes(checkpoint_path) -> tuple[str, str]:
    """(ss_sd_model_hash, ss_new_sd_model_hash) of a checkpoint file, reading it in 1 MiB chunks.

    sd-scripts also hashes a Diffusers folder this way and records the placeholder
    "IsADirectory" for both; we keep that so the metadata matches.
    """
    checkpoint_path = os.fspath(checkpoint_path)
    if os.path.isdir(checkpoint_path):
        return "IsADirectory", "IsADirectory"
    full_hash = hashlib.sha256()
    with open(checkpoint_path, "rb") as checkpoint:
        checkpoint.seek(LEGACY_HASH_OFFSET)
        legacy_hash = hashlib.sha256(checkpoint.read(LEGACY_HASH_LENGTH)).hexdigest()[:8]
        checkpoint.seek(0)
        for chunk in iter(lambda: checkpoint.read(_READ_CHUNK), b""):
            full_hash.update(chunk)
    return legacy_hash, full_hash.hexdigest()
