"""Loading and saving SDXL checkpoints in both real layouts, on the tiny SDXL made by tools/make_tiny_sdxl.py."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import mindspore as ms

from library import model_conversion as conv
from library.errors import UserError
from library.model_configs import unet_config_from_sgm_shapes, vae_config_from_ldm_shapes
from library.model_loading import load_sdxl, load_vae, save_single_file
from library.safetensors_io import open_safetensors, save_safetensors
from library.sdxl_unet import SDXL_BASE_UNET, SDXLUNet, UNetConfig
from library.sdxl_vae import SDXL_VAE, AutoencoderKL, VAEConfig
from library.text_encoders import SDXLTextEncoding, eos_mask

REFERENCE = Path(__file__).parent / "reference"


def _reference_shapes(prefix):
    shapes = {}
    for line in (REFERENCE / "sdxl-base-single-file-keys.tsv").read_text().splitlines()[1:]:
        key, shape, _ = line.split("\t")
        if key.startswith(prefix):
            shapes[key[len(prefix):]] = tuple(json.loads(shape))
    return shapes


@pytest.fixture(scope="module")
def both_layouts(tiny_sdxl_files):
    return load_sdxl(tiny_sdxl_files["single"]), load_sdxl(tiny_sdxl_files["diffusers"])


def test_single_file_round_trip_is_bit_exact(tiny_sdxl_files, both_layouts, tmp_path):
    single, _ = both_layouts
    out = tmp_path / "again.safetensors"
    save_single_file(single, str(out))
    with open_safetensors(tiny_sdxl_files["single"]) as original, open_safetensors(out) as again:
        assert sorted(original.keys()) == sorted(again.keys())
        for key in original.keys():
            assert original.dtype(key) == again.dtype(key)
            np.testing.assert_array_equal(original.read(key), again.read(key), err_msg=key)


def _conditioning(rng, unet_config):
    x = ms.Tensor(rng.standard_normal((2, 4, 8, 8)).astype(np.float32))
    t = ms.Tensor(np.array([3, 870], np.int32))
    context = ms.Tensor(rng.standard_normal((2, 77, unet_config.context_dim)).astype(np.float32))
    y = ms.Tensor(rng.standard_normal((2, unet_config.adm_in_channels)).astype(np.float32))
    return x, t, context, y


def test_single_file_and_diffusers_folder_give_the_same_outputs(both_layouts):
    single, diffusers = both_layouts
    rng = np.random.default_rng(0)
    inputs = _conditioning(rng, single.unet.config)
    out_single = single.unet(*inputs).asnumpy()
    assert np.abs(out_single).mean() > 1e-3
    np.testing.assert_array_equal(out_single, diffusers.unet(*inputs).asnumpy())

    images = ms.Tensor(rng.uniform(-1, 1, (1, 3, 64, 64)).astype(np.float32))
    mean_single, _ = single.vae.encode_moments(images)
    mean_diffusers, _ = diffusers.vae.encode_moments(images)
    assert mean_single.shape == (1, 4, 8, 8)
    np.testing.assert_array_equal(mean_single.asnumpy(), mean_diffusers.asnumpy())
    np.testing.assert_array_equal(single.vae.decode(mean_single).asnumpy(), diffusers.vae.decode(mean_diffusers).asnumpy())

    ids = np.zeros((1, 77), np.int32)
    ids[0, :7] = [49406, 320, 1125, 539, 320, 2368, 49407]
    results = []
    for models in both_layouts:
        encoding = SDXLTextEncoding(models.text_encoder1, models.text_encoder2)
        context, pooled = encoding(ms.Tensor(ids), ms.Tensor(ids), ms.Tensor(eos_mask(ids)))
        results.append((context.asnumpy(), pooled.asnumpy()))
    assert results[0][0].shape == (1, 77, single.unet.config.context_dim)
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])


def test_pooled_embedding_uses_open_clip_projection_orientation(tiny_sdxl_files, both_layouts):
    """open_clip pools as `x @ text_projection`: recompute that from the raw single-file tensor."""
    single, _ = both_layouts
    ids = np.zeros((1, 77), np.int32)
    ids[0, :4] = [49406, 320, 2368, 49407]
    encoding = SDXLTextEncoding(single.text_encoder1, single.text_encoder2)
    _, pooled = encoding(ms.Tensor(ids), ms.Tensor(ids), ms.Tensor(eos_mask(ids)))
    last_hidden = single.text_encoder2.text_model(ms.Tensor(ids), return_dict=False)[0].asnumpy()
    with open_safetensors(tiny_sdxl_files["single"]) as reader:
        projection = reader.read_float32(conv.TE2_PREFIX + "text_projection")
    assert not np.allclose(projection, projection.T)
    np.testing.assert_allclose(pooled.asnumpy(), last_hidden[:, 3] @ projection, rtol=1e-5, atol=1e-5)


def test_tiny_unet_runs_compiled_in_graph_mode(both_layouts):
    single, _ = both_layouts
    inputs = _conditioning(np.random.default_rng(1), single.unet.config)
    compiled = ms.jit(single.unet.construct)
    np.testing.assert_allclose(compiled(*inputs).asnumpy(), single.unet(*inputs).asnumpy(), rtol=1e-4, atol=1e-5)


def test_full_sdxl_names_and_config_match_reference_checkpoint():
    """Key names depend on depth, not width: a narrow model with SDXL's depths has exactly SDXL's names."""
    narrow_unet = UNetConfig(model_channels=32, num_head_channels=32, context_dim=16, adm_in_channels=1552)
    unet_names = {name for name, _ in SDXLUNet(narrow_unet).parameters_and_names()}
    assert unet_names == set(_reference_shapes(conv.UNET_PREFIX))
    assert unet_config_from_sgm_shapes(_reference_shapes(conv.UNET_PREFIX)) == SDXL_BASE_UNET

    vae_names = {name for name, _ in AutoencoderKL(VAEConfig(ch=32)).parameters_and_names()}
    assert vae_names == set(_reference_shapes(conv.VAE_PREFIX))
    assert vae_config_from_ldm_shapes(_reference_shapes(conv.VAE_PREFIX)) == SDXL_VAE


def test_unet_name_maps_are_inverse_and_cover_sdxl():
    names = set(_reference_shapes(conv.UNET_PREFIX))
    state = {name: np.zeros(1) for name in names}
    diffusers = conv.unet_sgm_to_diffusers(state, SDXL_BASE_UNET)
    assert "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight" in diffusers
    assert "up_blocks.0.upsamplers.0.conv.weight" in diffusers
    assert "mid_block.resnets.1.time_emb_proj.weight" in diffusers
    assert set(conv.unet_diffusers_to_sgm(diffusers, SDXL_BASE_UNET)) == names
    assert conv.unet_sgm_module_to_diffusers("input_blocks.4.1.proj_in", SDXL_BASE_UNET) == "down_blocks.1.attentions.0.proj_in"
    assert conv.unet_diffusers_module_to_sgm("up_blocks.1.upsamplers.0.conv", SDXL_BASE_UNET) == "output_blocks.5.2.conv"


def test_open_clip_conversion_round_trips_reference_names():
    shapes = _reference_shapes(conv.TE2_PREFIX)
    rng = np.random.default_rng(0)
    state = {name: rng.standard_normal(shape[:1] + (2,) * (len(shape) > 1)) for name, shape in shapes.items()}
    hf = conv.open_clip_to_hf(state)
    assert "text_model.encoder.layers.31.self_attn.v_proj.weight" in hf
    back = conv.hf_to_open_clip(hf)
    assert set(back) == set(state)
    for name in state:
        np.testing.assert_array_equal(back[name], state[name])


def test_vae_loads_from_diffusers_named_file_and_ldm_named_file(tiny_sdxl_files, both_layouts, tmp_path):
    single, _ = both_layouts
    vae_folder = os.path.join(tiny_sdxl_files["diffusers"], "vae")
    from_folder = load_vae(vae_folder)
    lone_file = tmp_path / "vae.safetensors"
    shutil.copy(os.path.join(vae_folder, "diffusion_pytorch_model.safetensors"), lone_file)
    from_file = load_vae(str(lone_file))
    from_checkpoint = load_vae(tiny_sdxl_files["single"])
    image = ms.Tensor(np.random.default_rng(2).uniform(-1, 1, (1, 3, 32, 32)).astype(np.float32))
    expected = single.vae.encode_moments(image)[0].asnumpy()
    for vae in (from_folder, from_file, from_checkpoint):
        np.testing.assert_array_equal(vae.encode_moments(image)[0].asnumpy(), expected)


def test_half_precision_file_loads_into_float32(tiny_sdxl_files, both_layouts, tmp_path):
    single, _ = both_layouts
    half = tmp_path / "half.safetensors"
    save_single_file(single, str(half), np.float16)
    loaded = load_sdxl(str(half))
    weight = loaded.unet.input_blocks[1][0].in_layers[2].weight
    assert weight.dtype == ms.float32
    expected = single.unet.input_blocks[1][0].in_layers[2].weight.asnumpy().astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(weight.asnumpy(), expected)


def _expect_error(path, *fragments):
    with pytest.raises(UserError) as info:
        load_sdxl(str(path))
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
    return message


def test_truncated_file_is_a_clear_error(tiny_sdxl_files, tmp_path):
    data = Path(tiny_sdxl_files["single"]).read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    _expect_error(truncated, "truncated.safetensors", "not a valid safetensors file")


def test_sd15_shaped_file_is_refused(tmp_path):
    sd15 = tmp_path / "sd15.safetensors"
    save_safetensors({
        "model.diffusion_model.input_blocks.0.0.weight": np.zeros((320, 4, 3, 3), np.float16),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": np.zeros((4, 768), np.float16),
    }, sd15)
    _expect_error(sd15, "sd15.safetensors", "SD 1.x/2.x")


def test_missing_paths_and_components_are_clear_errors(tiny_sdxl_files, tmp_path):
    _expect_error(tmp_path / "nowhere", "nowhere", "model not found")
    broken = tmp_path / "broken_diffusers"
    shutil.copytree(tiny_sdxl_files["diffusers"], broken)
    shutil.rmtree(broken / "text_encoder_2")
    _expect_error(broken, "text_encoder_2")
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"not really")
    _expect_error(pickle, "pickle", "convert it to .safetensors")


def test_missing_and_misshaped_keys_are_named_with_counts(tiny_sdxl_files, tmp_path):
    with open_safetensors(tiny_sdxl_files["single"]) as reader:
        state = {key: reader.read(key) for key in reader.keys()}
    del state[conv.UNET_PREFIX + "out.2.bias"]
    key = conv.UNET_PREFIX + "time_embed.0.bias"
    state[key] = np.zeros(state[key].shape[0] + 1, state[key].dtype)
    damaged = tmp_path / "damaged.safetensors"
    save_safetensors(state, damaged)
    _expect_error(damaged, "1 missing (out.2.bias)", "1 wrong shape", "time_embed.0.bias")
