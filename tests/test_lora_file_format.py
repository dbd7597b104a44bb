"""The Kohya LoRA file: exact round trips in each save precision, sd-scripts' metadata and hashes
recomputed here, reference names and dtypes, atomic writes, and clear errors for files that do not fit."""

import hashlib
import json
import os
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from safetensors import safe_open

from library.errors import UserError
from library.layers import weight_init
from library.sdxl_unet import SDXL_BASE_UNET, SDXLUNet, UNetConfig
from library.text_encoders import build_text_encoder, clip_text_config
from networks.lora import create_network, create_network_from_weights
from networks.lora_weights import diffusers_lora_names
from tools.make_tiny_sdxl import TINY_TE1, TINY_TE2, TINY_UNET

REFERENCE = Path(__file__).parent / "reference"
SAFETENSORS_DTYPES = {np.dtype(np.float16): "F16", np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.float32): "F32"}


@pytest.fixture(scope="module")
def models():
    text_encoders = [build_text_encoder(clip_text_config(**dict(TINY_TE1, vocab_size=1000)), False),
                     build_text_encoder(clip_text_config(**dict(TINY_TE2, vocab_size=1000)), True)]
    with weight_init(seed=0):
        unet = SDXLUNet(TINY_UNET)
    return text_encoders, unet


def trained_network(models, seed=0, **network_args):
    """A network whose up and down weights are all nonzero, as after training."""
    text_encoders, unet = models
    network = create_network(1.0, 16, 8, None, text_encoders, unet, conv_dim="8", conv_alpha="4", **network_args)
    rng = np.random.default_rng(seed)
    state = network.state_dict()
    for key in state:
        if not key.endswith(".alpha"):
            state[key] = (0.1 * rng.standard_normal(state[key].shape)).astype(np.float32)
    network.load_state_dict(state)
    return network


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32])
def test_save_and_load_round_trip_exactly_in_each_precision(models, tmp_path, dtype):
    network = trained_network(models)
    path = tmp_path / "lora.safetensors"
    network.save_weights(str(path), dtype, {})
    state = network.state_dict()

    stored = safetensors.numpy.load_file(str(path))  # an independent reader
    assert set(stored) == set(state)
    with safe_open(str(path), framework="numpy") as handle:
        assert {handle.get_slice(key).get_dtype() for key in handle.keys()} == {SAFETENSORS_DTYPES[np.dtype(dtype)]}
    for key, value in state.items():
        assert stored[key].shape == value.shape
        assert np.array_equal(stored[key], value.astype(dtype)), key
    assert stored["lora_unet_input_blocks_4_1_proj_in.alpha"].shape == ()
    assert float(stored["lora_unet_input_blocks_4_1_proj_in.alpha"]) == 8.0
    assert float(stored["lora_unet_input_blocks_1_0_in_layers_2.alpha"]) == 4.0

    fresh = create_network(1.0, 16, 8, None, *models, conv_dim="8", conv_alpha="4")
    assert fresh.load_weights(str(path)) == []
    reloaded = fresh.state_dict()
    for key, value in stored.items():
        assert np.array_equal(reloaded[key], value.astype(np.float32)), key


def sshs_hashes_by_hand(path):
    """sd-webui-additional-networks' hashes: sha256 of the bytes after the header, and the first 8 hex
    digits of sha256 of the 64 KiB at 1 MiB of the file saved with only its ss_* metadata."""
    data = Path(path).read_bytes()
    header_length = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header_length:]).hexdigest()
    with safe_open(str(path), framework="numpy") as handle:
        metadata = handle.metadata()
    tensors = safetensors.numpy.load_file(str(path))
    training_only = safetensors.numpy.save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    return model_hash, hashlib.sha256(training_only[0x100000:0x110000]).hexdigest()[:8], len(training_only)


def test_metadata_is_stored_as_strings_with_true_hashes(models, tmp_path):
    network = trained_network(models)
    metadata = {"ss_learning_rate": 1e-4, "ss_output_name": "demo", "modelspec.title": "demo",
                "modelspec.architecture": "stable-diffusion-xl-v1-base/lora", "sshs_model_hash": "stale"}
    metadata.update(network.metadata())
    path = tmp_path / "demo.safetensors"
    network.save_weights(str(path), np.float16, metadata)

    with safe_open(str(path), framework="numpy") as handle:
        saved = handle.metadata()
    model_hash, legacy_hash, size = sshs_hashes_by_hand(path)
    assert size > 0x110000  # large enough that the legacy hash window holds real tensor bytes
    assert saved["sshs_model_hash"] == model_hash
    assert saved["sshs_legacy_hash"] == legacy_hash
    assert saved["ss_learning_rate"] == "0.0001"
    assert saved["ss_network_module"] == "networks.lora"
    assert saved["ss_network_dim"] == "16" and saved["ss_network_alpha"] == "8"
    assert json.loads(saved["ss_network_args"]) == {"conv_dim": "8", "conv_alpha": "4"}
    assert (saved["ss_base_model_version"], saved["ss_v2"]) == ("sdxl_base_v1-0", "False")
    assert saved["modelspec.title"] == "demo"


def test_full_sdxl_file_has_sd_scripts_names_and_dtypes(tmp_path):
    """Names depend on depth, not width (shapes at full width: benchmarks/full_size_lora_keys.py)."""
    with weight_init(skip=True):
        unet = SDXLUNet(UNetConfig(model_channels=32, num_head_channels=32, context_dim=16, adm_in_channels=1552))
    network = create_network(1.0, 8, 4, None, [], unet)
    path = tmp_path / "full.safetensors"
    network.save_weights(str(path), np.float16, {})
    with safe_open(str(path), framework="numpy") as handle:
        saved = {key: handle.get_slice(key).get_dtype() for key in handle.keys()}
    lines = (REFERENCE / "sdxl-lora-rank8-unet-only-keys.tsv").read_text().splitlines()[1:]
    reference = {line.split("\t")[0]: line.split("\t")[2] for line in lines}
    assert len(saved) == 2166
    assert saved == reference


def test_failed_save_leaves_the_previous_file_intact(models, tmp_path, monkeypatch):
    network = trained_network(models)
    path = tmp_path / "lora.safetensors"
    network.save_weights(str(path), np.float16, {})
    before = path.read_bytes()

    def disk_full(_descriptor):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError):
        trained_network(models, seed=1).save_weights(str(path), np.float32, {})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["lora.safetensors"]


def test_only_safetensors_files_are_written_and_read(models, tmp_path):
    network = create_network(1.0, 4, 1, None, *models)
    with pytest.raises(UserError, match="lora.ckpt.*safetensors"):
        network.save_weights(str(tmp_path / "lora.ckpt"), np.float16, {})
    with pytest.raises(UserError, match="lora.pt.*only .safetensors"):
        network.load_weights(str(tmp_path / "lora.pt"))


# ---- Files made elsewhere -------------------------------------------------------------------------


def write_kohya(path, tensors):
    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))
    return str(path)


def kohya_module(name, out_dim, in_dim, rank, alpha=None, dtype=np.float16, seed=0):
    rng = np.random.default_rng(seed)
    tensors = {f"{name}.lora_down.weight": rng.standard_normal((rank, in_dim)).astype(dtype),
               f"{name}.lora_up.weight": rng.standard_normal((out_dim, rank)).astype(dtype)}
    if alpha is not None:
        tensors[f"{name}.alpha"] = np.array(alpha, dtype)
    return tensors


def test_file_without_alpha_means_alpha_equals_rank(models, tmp_path):
    path = write_kohya(tmp_path / "old.safetensors",
                       kohya_module("lora_unet_input_blocks_4_1_proj_in", 64, 64, rank=6))
    network, weights = create_network_from_weights(1.0, path, None, *models)
    (lora,) = network.loras
    assert (lora.lora_name, lora.lora_dim, lora.alpha, lora.scale) == ("lora_unet_input_blocks_4_1_proj_in", 6, 6.0, 1.0)
    assert weights["lora_unet_input_blocks_4_1_proj_in.alpha"] == 6.0


def test_diffusers_named_unet_modules_become_sgm_names(models, tmp_path):
    tensors = kohya_module("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", 64, 64, 4, 2)
    tensors.update(kohya_module("lora_unet_up_blocks_0_resnets_2_conv_shortcut", 128, 192, 4, 2))
    tensors.update(kohya_module("lora_te2_text_model_encoder_layers_1_mlp_fc1", 256, 128, 4, 2))
    tensors["lora_unet_up_blocks_0_resnets_2_conv_shortcut.lora_down.weight"] = tensors[
        "lora_unet_up_blocks_0_resnets_2_conv_shortcut.lora_down.weight"].reshape(4, 192, 1, 1)
    tensors["lora_unet_up_blocks_0_resnets_2_conv_shortcut.lora_up.weight"] = tensors[
        "lora_unet_up_blocks_0_resnets_2_conv_shortcut.lora_up.weight"].reshape(128, 4, 1, 1)
    network, weights = create_network_from_weights(1.0, write_kohya(tmp_path / "d.safetensors", tensors), None, *models)
    assert sorted(lora.lora_name for lora in network.loras) == [
        "lora_te2_text_model_encoder_layers_1_mlp_fc1",
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        "lora_unet_output_blocks_2_0_skip_connection",
    ]
    assert np.array_equal(weights["lora_unet_output_blocks_2_0_skip_connection.lora_up.weight"],
                          tensors["lora_unet_up_blocks_0_resnets_2_conv_shortcut.lora_up.weight"].astype(np.float32))


def test_diffusers_to_sgm_lora_names_for_full_sdxl_both_ways():
    sgm_paths = ["input_blocks.4.1.transformer_blocks.0.attn1.to_q", "output_blocks.2.2.conv", "input_blocks.3.0.op",
                 "middle_block.2.in_layers.2", "output_blocks.5.0.skip_connection", "input_blocks.8.0.emb_layers.1"]
    names = diffusers_lora_names(sgm_paths, SDXL_BASE_UNET)
    assert names == {
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q":
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        "lora_unet_up_blocks_0_upsamplers_0_conv": "lora_unet_output_blocks_2_2_conv",
        "lora_unet_down_blocks_0_downsamplers_0_conv": "lora_unet_input_blocks_3_0_op",
        "lora_unet_mid_block_resnets_1_conv1": "lora_unet_middle_block_2_in_layers_2",
        "lora_unet_up_blocks_1_resnets_2_conv_shortcut": "lora_unet_output_blocks_5_0_skip_connection",
        "lora_unet_down_blocks_2_resnets_1_time_emb_proj": "lora_unet_input_blocks_8_0_emb_layers_1",
    }
    back = {sgm: diffusers for diffusers, sgm in names.items()}
    assert len(back) == len(names)


@pytest.mark.parametrize("key,shape,message", [
    ("lora_unet_input_blocks_4_1_proj_in.hada_w1_a", (4, 64), "hada_w1_a' is a LyCORIS tensor"),
    ("lora_unet_input_blocks_4_1_proj_in.dora_scale", (1, 64), "dora_scale' is a LyCORIS tensor"),
    ("lora_unet_input_blocks_4_1_proj_in.lora_mid.weight", (4, 4, 3, 3), "lora_mid.weight' is a LyCORIS tensor"),
    ("lora_unet_input_blocks_4_1_proj_in.lora_A.weight", (4, 64), "lora_A.weight' is not a Kohya LoRA tensor"),
    ("lora_unet_input_blocks_99_1_proj_in.lora_up.weight", (64, 4), "this model has no LoRA module 'lora_unet_input_blocks_99"),
    ("lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight", (128, 4), "this model has no LoRA module 'lora_te_text"),
])
def test_tensors_that_do_not_fit_are_named(models, tmp_path, key, shape, message):
    tensors = kohya_module("lora_unet_input_blocks_4_1_proj_out", 64, 64, 4, 1)
    tensors[key] = np.zeros(shape, np.float16)
    path = write_kohya(tmp_path / "bad.safetensors", tensors)
    with pytest.raises(UserError, match=f"bad.safetensors: 1 LoRA tensor.*{message}"):
        create_network_from_weights(1.0, path, None, *models)


def test_shape_mismatches_are_named_and_can_all_be_listed(models, tmp_path):
    tensors = {}
    for index in range(5):
        # SD 1.5-sized modules: 320 channels where the model has 64.
        tensors.update(kohya_module(f"lora_unet_input_blocks_4_1_transformer_blocks_0_attn{index % 2 + 1}_to_"
                                    + "qkv"[index // 2], 320, 320, 4, 1))
    path = write_kohya(tmp_path / "sd15.safetensors", tensors)
    with pytest.raises(UserError) as short:
        create_network_from_weights(1.0, path, None, *models)
    message = str(short.value)
    assert "5 LoRA tensor(s) do not fit" in message and "and 2 more" in message
    assert "'lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight' has shape [4, 320], " \
           "this model needs [rank, 64]" in message
    assert "\n" not in message
    with pytest.raises(UserError) as full:
        create_network_from_weights(1.0, path, None, *models, list_unmatched=True)
    assert str(full.value).count("has shape") == 5 and "more" not in str(full.value)


def test_loading_a_file_of_another_rank_or_alpha_into_a_network_is_refused(models, tmp_path):
    network = create_network(1.0, 4, 1, None, *models)
    path = write_kohya(tmp_path / "r8.safetensors", kohya_module("lora_unet_input_blocks_4_1_proj_in", 64, 64, 8, 1))
    with pytest.raises(UserError, match="r8.safetensors.*'lora_unet_input_blocks_4_1_proj_in' has rank 8, this network 4"):
        network.load_weights(path)
    path = write_kohya(tmp_path / "a2.safetensors", kohya_module("lora_unet_input_blocks_4_1_proj_in", 64, 64, 4, 2))
    with pytest.raises(UserError, match="alpha.*is 2, this network's alpha is 1"):
        network.load_weights(path)
    path = write_kohya(tmp_path / "ok.safetensors", kohya_module("lora_unet_input_blocks_4_1_proj_in", 64, 64, 4, 1))
    missing = network.load_weights(path)
    assert len(missing) == len(network.loras) - 1 and "lora_unet_input_blocks_4_1_proj_in" not in missing
    path = write_kohya(tmp_path / "conv.safetensors", kohya_module("lora_unet_input_blocks_4_0_emb_layers_1", 64, 128, 4, 1))
    with pytest.raises(UserError, match="this network has no LoRA module 'lora_unet_input_blocks_4_0_emb_layers_1'"):
        network.load_weights(path)  # a conv-block module, but this network was made without conv_dim
