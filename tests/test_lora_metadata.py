import base64
import hashlib
import json
import time
from types import SimpleNamespace

import numpy as np
import pytest

from library.errors import UserError
from library.lora_metadata import (
    SS_MINIMUM_KEYS,
    SS_TRAINING_KEYS,
    build_modelspec,
    finalize_lora_metadata,
    modelspec_from_args,
    source_model_metadata,
)
from library.model_hashes import base_model_hashes
from library.safetensors_io import read_metadata, save_safetensors

TAG_FREQUENCY = {
    "img": {
        "a photo of a yellow cross on a white background": 1,
        "peertoken": 8,
        "a photo of a white triangle on a blue background": 1,
        "a photo of a purple triangle on a white background": 1,
        "a photo of a blue triangle on a green background": 1,
        "a photo of a black circle on a white background": 1,
        "a photo of a blue square on a black background": 1,
        "a photo of a green circle on a yellow background": 1,
        "a photo of a black square on a blue background": 1,
    }
}
SUBSET = {
    "img_count": 8, "num_repeats": 1, "color_aug": False, "flip_aug": False, "random_crop": False,
    "shuffle_caption": False, "keep_tokens": 0, "keep_tokens_separator": "", "secondary_separator": None,
    "enable_wildcard": False, "caption_prefix": None, "caption_suffix": None, "resize_interpolation": None,
    "image_dir": "img", "class_tokens": None, "is_reg": False,
}  # fmt: skip
DATASET = {
    "is_dreambooth": True, "batch_size_per_device": 1, "num_train_images": 8, "num_reg_images": 0,
    "resolution": [256, 256], "enable_bucket": False, "min_bucket_reso": None, "max_bucket_reso": None,
    "tag_frequency": TAG_FREQUENCY, "bucket_info": None, "resize_interpolation": None, "subsets": [SUBSET],
}  # fmt: skip

# The 80 metadata entries of an SDXL LoRA written by torch sd-scripts (measured, see
# shared/reference/sdxl-lora-metadata-example.json), embedded so CI needs no outside files.
REFERENCE_METADATA = {
    "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
    "modelspec.date": "2026-11-22T03:39:27",
    "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
    "modelspec.implementation_version": "sd-scripts/unknown",
    "modelspec.prediction_type": "epsilon",
    "modelspec.resolution": "256x256",
    "modelspec.sai_model_spec": "1.0.1",
    "modelspec.title": "peer_lora",
    "ss_adaptive_noise_scale": "None",
    "ss_base_model_version": "sdxl_base_v1-0",
    "ss_cache_latents": "True",
    "ss_caption_dropout_every_n_epochs": "0",
    "ss_caption_dropout_rate": "0.0",
    "ss_caption_tag_dropout_rate": "0.0",
    "ss_clip_skip": "None",
    "ss_dataset_dirs": '{"img": {"n_repeats": 1, "img_count": 8}}',
    "ss_datasets": json.dumps([DATASET]),
    "ss_debiased_estimation": "False",
    "ss_epoch": "1",
    "ss_face_crop_aug_range": "None",
    "ss_fp8_base": "False",
    "ss_fp8_base_unet": "False",
    "ss_full_fp16": "False",
    "ss_gradient_accumulation_steps": "1",
    "ss_gradient_checkpointing": "False",
    "ss_huber_c": "0.1",
    "ss_huber_scale": "1.0",
    "ss_huber_schedule": "snr",
    "ss_ip_noise_gamma": "None",
    "ss_ip_noise_gamma_random_strength": "False",
    "ss_learning_rate": "0.0001",
    "ss_loss_type": "l2",
    "ss_lowram": "False",
    "ss_lr_scheduler": "constant",
    "ss_lr_warmup_steps": "0",
    "ss_max_grad_norm": "1.0",
    "ss_max_token_length": "None",
    "ss_max_train_steps": "6",
    "ss_max_validation_steps": "None",
    "ss_min_snr_gamma": "None",
    "ss_mixed_precision": "no",
    "ss_multires_noise_discount": "0.3",
    "ss_multires_noise_iterations": "None",
    "ss_network_alpha": "4.0",
    "ss_network_dim": "8",
    "ss_network_dropout": "None",
    "ss_network_module": "networks.lora",
    "ss_new_sd_model_hash": "d4247de98f7b718c340c5527e3eadb916ebdc0f0435d3de3bfbbddfed456ecf7",
    "ss_noise_offset": "None",
    "ss_noise_offset_random_strength": "False",
    "ss_num_batches_per_epoch": "8",
    "ss_num_epochs": "1",
    "ss_num_reg_images": "0",
    "ss_num_train_images": "8",
    "ss_num_validation_images": "0",
    "ss_optimizer": "torch.optim.adamw.AdamW",
    "ss_output_name": "peer_lora",
    "ss_prior_loss_weight": "1.0",
    "ss_resize_interpolation": "None",
    "ss_scale_weight_norms": "None",
    "ss_sd_model_hash": "05378550",
    "ss_sd_model_name": "sdxl_random_fp16.safetensors",
    "ss_sd_scripts_commit_hash": "(unknown)",
    "ss_seed": "42",
    "ss_session_id": "1645443438",
    "ss_steps": "6",
    "ss_tag_frequency": json.dumps(TAG_FREQUENCY),
    "ss_text_encoder_lr": "None",
    "ss_training_comment": "None",
    "ss_training_finished_at": "1795318767.1165962",
    "ss_training_started_at": "1795318635.720875",
    "ss_unet_lr": "None",
    "ss_v2": "False",
    "ss_validate_every_n_epochs": "None",
    "ss_validate_every_n_steps": "None",
    "ss_validation_seed": "None",
    "ss_validation_split": "0.0",
    "ss_zero_terminal_snr": "False",
    "sshs_legacy_hash": "be4b03a3",
    "sshs_model_hash": "497977e9d38f7343ae8b7065f800b2c0eba053ff791621088c85b29cdc56e3b2",
}
REFERENCE_TRAINING = {key: value for key, value in REFERENCE_METADATA.items() if key.startswith("ss_")}
REFERENCE_MODELSPEC = {key: value for key, value in REFERENCE_METADATA.items() if key.startswith("modelspec.")}
REFERENCE_SAVE_TIME = 1795318767.1165962


@pytest.fixture
def utc(monkeypatch):
    """modelspec.date is local time; pin the zone the reference was recorded in."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def lora_tensors():
    """A small SDXL-style LoRA, large enough (> 1 MiB + 64 KiB) for the legacy hash window."""
    rng = np.random.default_rng(3)
    rank = 160
    tensors = {}
    for module, (out_features, in_features) in {
        "lora_unet_input_blocks_4_1_proj_in": (640, 640),
        "lora_unet_middle_block_1_proj_out": (1280, 1280),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1": (3072, 768),
    }.items():
        tensors[f"{module}.alpha"] = np.array(4.0, dtype=np.float16)
        tensors[f"{module}.lora_down.weight"] = rng.standard_normal((rank, in_features)).astype(np.float16)
        tensors[f"{module}.lora_up.weight"] = rng.standard_normal((out_features, rank)).astype(np.float16)
    return tensors


def independent_sshs_hashes(path):
    """Recompute sshs_* from the written file with hashlib and a hand-built header.

    The hashes describe the file as it would be with only ss_* metadata: same tensor data,
    a header holding only the ss_* entries, padded with spaces to a multiple of 8 bytes.
    """
    raw = path.read_bytes()
    header_length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_length])
    tensor_data = raw[8 + header_length :]

    def padded_header(metadata):
        entries = {"__metadata__": metadata, **{k: v for k, v in header.items() if k != "__metadata__"}}
        text = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        return text + b" " * (-len(text) % 8)

    # The reconstruction must reproduce the real header's length, or the legacy window would shift.
    assert len(padded_header(header["__metadata__"])) == header_length
    training_only = {k: v for k, v in header["__metadata__"].items() if k.startswith("ss_")}
    training_header = padded_header(training_only)
    hashed_file = len(training_header).to_bytes(8, "little") + training_header + tensor_data
    assert len(hashed_file) > 0x110000, "test LoRA too small to exercise the legacy hash window"
    return hashlib.sha256(tensor_data).hexdigest(), hashlib.sha256(hashed_file[0x100000:0x110000]).hexdigest()[:8]


def test_training_keys_are_the_reference_ss_keys():
    assert SS_TRAINING_KEYS == sorted(REFERENCE_TRAINING)
    assert len(SS_TRAINING_KEYS) == 70


def test_default_modelspec_matches_sd_scripts(utc):
    spec = build_modelspec(title="peer_lora", resolution="256", timestamp=REFERENCE_SAVE_TIME)
    assert spec == {**REFERENCE_MODELSPEC, "modelspec.implementation_version": "sdxl-lora-mindspore/0.1.0"}


@pytest.mark.parametrize(
    "resolution, expected",
    [(None, "1024x1024"), (512, "512x512"), ("768", "768x768"), ("512,768", "512x768"),
     ((640,), "640x640"), ((832, 1216), "832x1216")],
)  # fmt: skip
def test_resolution_forms(resolution, expected):
    assert build_modelspec(title="t", resolution=resolution)["modelspec.resolution"] == expected


@pytest.mark.parametrize(
    "min_timestep, max_timestep, expected",
    [(None, None, None), (200, None, "200,1000"), (None, 800, "0,800"), (0, 1000, "0,1000")],
)
def test_timestep_range(min_timestep, max_timestep, expected):
    spec = build_modelspec(title="t", min_timestep=min_timestep, max_timestep=max_timestep)
    assert spec.get("modelspec.timestep_range") == expected


def test_optional_fields_v_prediction_and_clip_skip():
    spec = build_modelspec(
        title="t",
        v_parameterization=True,
        clip_skip=2,
        author="me",
        description="d",
        license="openrail++",
        tags="a,b",
        usage_hint="say sks",
        merged_from="x, y",
        trigger_phrase="sks dog",
        preprocessor="canny",
        is_negative_embedding="False",
        thumbnail="data:image/png;base64,AAAA",
    )
    assert spec["modelspec.prediction_type"] == "v"
    assert spec["modelspec.encoder_layer"] == "2"
    assert {key: spec[key] for key in spec if key not in REFERENCE_MODELSPEC} == {
        "modelspec.encoder_layer": "2",
        "modelspec.author": "me",
        "modelspec.description": "d",
        "modelspec.license": "openrail++",
        "modelspec.tags": "a,b",
        "modelspec.usage_hint": "say sks",
        "modelspec.merged_from": "x, y",
        "modelspec.trigger_phrase": "sks dog",
        "modelspec.preprocessor": "canny",
        "modelspec.is_negative_embedding": "False",
        "modelspec.thumbnail": "data:image/png;base64,AAAA",
    }


def test_untitled_lora_is_named_after_the_timestamp():
    assert build_modelspec(title=None, timestamp=1700000000.25)["modelspec.title"] == "LoRA@1700000000.25"


def test_thumbnail_file_is_embedded_as_data_url(tmp_path):
    image = tmp_path / "thumb.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\nnot really an image")
    url = build_modelspec(title="t", thumbnail=str(image))["modelspec.thumbnail"]
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    assert base64.b64decode(url[len(prefix) :]) == image.read_bytes()


def test_missing_thumbnail_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="--metadata_thumbnail"):
        build_modelspec(title="t", thumbnail=str(tmp_path / "absent.png"))


def test_modelspec_from_args_prefers_metadata_title(utc):
    args = SimpleNamespace(
        metadata_title=None, output_name="peer_lora", resolution=(256, 256), v_parameterization=False,
        min_timestep=None, max_timestep=None, clip_skip=None, metadata_author=None, metadata_description=None,
        metadata_license=None, metadata_tags=None, metadata_usage_hint=None, metadata_thumbnail=None,
        metadata_merged_from=None, metadata_trigger_phrase=None, metadata_preprocessor=None,
        metadata_is_negative_embedding=None,
    )  # fmt: skip
    spec = modelspec_from_args(args, timestamp=REFERENCE_SAVE_TIME)
    assert set(spec) == set(REFERENCE_MODELSPEC)
    assert spec["modelspec.title"] == "peer_lora"
    assert spec["modelspec.date"] == "2026-11-22T03:39:27"
    args.metadata_title = "Shapes"
    assert modelspec_from_args(args)["modelspec.title"] == "Shapes"


def save_final_lora(path, metadata, no_metadata=False):
    tensors = lora_tensors()
    final = finalize_lora_metadata(tensors, metadata, no_metadata=no_metadata)
    save_safetensors(tensors, path, final)
    return final


def test_full_metadata_file_has_exactly_the_reference_keys_and_true_hashes(tmp_path, utc):
    path = tmp_path / "peer_lora.safetensors"
    modelspec = build_modelspec(title="peer_lora", resolution="256", timestamp=REFERENCE_SAVE_TIME)
    final = save_final_lora(path, {**REFERENCE_TRAINING, **modelspec})

    written = read_metadata(path)
    assert written == final
    assert set(written) == set(REFERENCE_METADATA)
    assert sorted(key for key in written if key.startswith("ss_")) == SS_TRAINING_KEYS
    assert {key: written[key] for key in REFERENCE_TRAINING} == REFERENCE_TRAINING
    assert (written["sshs_model_hash"], written["sshs_legacy_hash"]) == independent_sshs_hashes(path)


def test_hashes_survive_non_ascii_metadata(tmp_path):
    path = tmp_path / "lora.safetensors"
    training = {**REFERENCE_TRAINING, "ss_training_comment": "猫の写真 ✓"}
    final = save_final_lora(path, {**training, **build_modelspec(title="猫")})
    assert (final["sshs_model_hash"], final["sshs_legacy_hash"]) == independent_sshs_hashes(path)


def test_no_metadata_keeps_minimum_ss_keys_modelspec_and_hashes(tmp_path):
    path = tmp_path / "lora.safetensors"
    training = {**REFERENCE_TRAINING, "ss_network_args": json.dumps({"conv_dim": "4"})}
    final = save_final_lora(path, {**training, **build_modelspec(title="peer_lora")}, no_metadata=True)

    written = read_metadata(path)
    assert written == final
    assert sorted(key for key in written if key.startswith("ss_")) == sorted(SS_MINIMUM_KEYS)
    assert {
        "ss_v2": "False",
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_network_module": "networks.lora",
        "ss_network_dim": "8",
        "ss_network_alpha": "4.0",
        "ss_network_args": '{"conv_dim": "4"}',
    }.items() <= written.items()
    assert set(REFERENCE_MODELSPEC) <= set(written)
    assert (written["sshs_model_hash"], written["sshs_legacy_hash"]) == independent_sshs_hashes(path)


def test_values_are_stored_as_python_str_like_sd_scripts():
    final = finalize_lora_metadata(
        lora_tensors(),
        {"ss_learning_rate": 1e-4, "ss_clip_skip": None, "ss_cache_latents": True, "ss_network_alpha": 4.0,
         "ss_network_dim": 8, "ss_resolution": (256, 256)},
    )  # fmt: skip
    assert {key: value for key, value in final.items() if key.startswith("ss_")} == {
        "ss_learning_rate": "0.0001",
        "ss_clip_skip": "None",
        "ss_cache_latents": "True",
        "ss_network_alpha": "4.0",
        "ss_network_dim": "8",
        "ss_resolution": "(256, 256)",
    }


def test_stale_hashes_are_recomputed():
    tensors = lora_tensors()
    fresh = finalize_lora_metadata(tensors, {"ss_network_dim": "8"})
    again = finalize_lora_metadata(tensors, {"ss_network_dim": "8", "sshs_model_hash": "0" * 64})
    assert again == fresh
    assert fresh["sshs_model_hash"] != "0" * 64


def test_unknown_metadata_family_is_rejected():
    with pytest.raises(ValueError, match="ss_ or modelspec"):
        finalize_lora_metadata(lora_tensors(), {"ss_network_dim": "8", "title": "x"})


def test_source_model_metadata_hashes_local_files_only(tmp_path):
    checkpoint = tmp_path / "models" / "sdxl_base.safetensors"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"not a real checkpoint, only hashed")
    vae = tmp_path / "vae.safetensors"
    vae.write_bytes(b"vae bytes")
    sd_legacy, sd_sha256 = base_model_hashes(checkpoint)

    assert source_model_metadata(str(checkpoint), str(vae)) == {
        "ss_sd_model_hash": sd_legacy,
        "ss_new_sd_model_hash": sd_sha256,
        "ss_sd_model_name": "sdxl_base.safetensors",
        "ss_vae_hash": "e3b0c442",
        "ss_new_vae_hash": hashlib.sha256(b"vae bytes").hexdigest(),
        "ss_vae_name": "vae.safetensors",
    }
    assert sd_sha256 == hashlib.sha256(b"not a real checkpoint, only hashed").hexdigest()
    assert source_model_metadata("stabilityai/stable-diffusion-xl-base-1.0") == {
        "ss_sd_model_name": "stabilityai/stable-diffusion-xl-base-1.0"
    }
    assert source_model_metadata(None) == {}
