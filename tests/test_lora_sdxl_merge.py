"""networks/sdxl_merge_lora.py: LoRAs merged into one LoRA by sd-scripts' rule (computed here in numpy),
--concat, --lbws, and LoRAs merged into the tiny SDXL checkpoint, checked weight by weight against
the base file and by running the merged model against the base model with the LoRA applied live."""

import math
import os

import numpy as np
import pytest
from safetensors import safe_open

from mindspore import Tensor

from library.model_hashes import precalculate_lora_hashes
from library.model_loading import load_sdxl
from lora_tool_files import (
    DIFFUSERS_NAMES, MODULES, delta, load, random_lora, renamed, run_tool, stored_weight, tiny_modules, write,
)
from networks import sdxl_merge_lora
from networks.lora import create_network_from_weights
from tools.make_tiny_sdxl import TINY_UNET

def relative_error(got, expected):
    return np.linalg.norm(got - expected) / np.linalg.norm(expected)


# ---- LoRAs into one LoRA -------------------------------------------------------------------------


def test_two_loras_merge_by_sd_scripts_rule(tmp_path):
    """down = sum ratio_i sqrt(alpha_i / base_alpha) down_i, up = sum |ratio_i sqrt(...)| up_i, where base_alpha
    is the first file's alpha for the module; modules in one file only are scaled alone."""
    a = random_lora(MODULES[:4], 4, 4.0, seed=0)
    b = random_lora(MODULES[2:], 4, 2.0, seed=1, dtype=np.float16)
    path_a = write(tmp_path / "a.safetensors", a, {"ss_v2": "False", "ss_base_model_version": "sdxl_base_v1-0",
                                                   "modelspec.title": "Style A"})
    path_b = write(tmp_path / "b.safetensors", b)
    out = tmp_path / "merged.safetensors"
    result = run_tool("sdxl_merge_lora.py", "--save_to", out, "--models", path_a, path_b, "--ratios", "0.7", "-0.4",
                      "--save_precision", "fp16")
    assert result.returncode == 0, result.stderr
    merged = load(out)

    for name in MODULES:
        down = up = 0
        base_alpha = 4.0 if name in MODULES[:4] else 2.0
        for tensors, ratio, alpha in ((a, 0.7, 4.0), (b, -0.4, 2.0)):
            if f"{name}.lora_down.weight" in tensors:
                scale = math.sqrt(alpha / base_alpha) * ratio
                down = down + tensors[f"{name}.lora_down.weight"].astype(np.float64) * scale
                up = up + tensors[f"{name}.lora_up.weight"].astype(np.float64) * abs(scale)
        np.testing.assert_allclose(merged[f"{name}.lora_down.weight"], down, rtol=2e-3, atol=1e-4, err_msg=name)
        np.testing.assert_allclose(merged[f"{name}.lora_up.weight"], up, rtol=2e-3, atol=1e-4, err_msg=name)
        assert float(merged[f"{name}.alpha"]) == base_alpha
    assert {value.dtype for value in merged.values()} == {np.dtype(np.float16)}

    metadata = safe_open(str(out), "numpy").metadata()
    assert {key: metadata[key] for key in metadata if key.startswith("ss_")} == {
        "ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "Dynamic",
        "ss_v2": "False", "ss_base_model_version": "sdxl_base_v1-0"}
    assert metadata["modelspec.merged_from"] == "Style A, b"
    assert metadata["modelspec.title"] == "merged"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert (metadata["sshs_model_hash"], metadata["sshs_legacy_hash"]) == precalculate_lora_hashes(merged, metadata)


def test_concat_stacks_ranks_with_sd_scripts_scaling(tmp_path):
    """With --concat the merged delta is sum_i ratio_i |ratio_i| alpha_i / (total rank) * up_i @ down_i:
    the first file's alpha is kept while the rank grows (sd-scripts' rule, not the sum of the deltas)."""
    a = random_lora(MODULES, 4, 4.0, seed=2)
    c = random_lora(MODULES, 2, 1.0, seed=3)
    out = tmp_path / "concat.safetensors"
    sdxl_merge_lora.main(["--save_to", str(out), "--models", write(tmp_path / "a.safetensors", a),
                          write(tmp_path / "c.safetensors", c), "--ratios", "0.5", "-1.5", "--concat", "--shuffle",
                          "--no_metadata"])
    merged = load(out)
    for name in MODULES:
        assert merged[f"{name}.lora_down.weight"].shape[0] == 6
        assert float(merged[f"{name}.alpha"]) == 4.0
        expected = (0.5 * 0.5 * 4.0 / 6 * delta(a, name) * 4 / 4.0
                    + -1.5 * 1.5 * 1.0 / 6 * delta(c, name) * 2 / 1.0)
        assert relative_error(delta(merged, name), expected) < 1e-5, name
    metadata = safe_open(str(out), "numpy").metadata()
    assert not any(key.startswith("modelspec.") for key in metadata)  # --no_metadata keeps the ss_* minimum
    assert metadata["ss_network_dim"] == "4"  # sd-scripts records the first file's rank


def test_lbws_scale_each_block_of_both_factors(tmp_path):
    assert sdxl_merge_lora.lbw_block_index("lora_te2_text_model_encoder_layers_1_self_attn_k_proj") == 0
    assert sdxl_merge_lora.lbw_block_index("lora_unet_input_blocks_4_0_in_layers_2") == 5
    assert sdxl_merge_lora.lbw_block_index("lora_unet_middle_block_1_proj_in") == 13
    assert sdxl_merge_lora.lbw_block_index("lora_unet_output_blocks_2_1_proj_in") == 16
    # The 12-value preset covers BASE, IN04, IN05, IN07, IN08, MID, OUT00..OUT05.
    assert sdxl_merge_lora.parse_lbws(["[0.5,0,1,1,1,1,1,1,2,1,1,1]"]) == [
        {0: 0.5, 5: 0.0, 6: 1.0, 8: 1.0, 9: 1.0, 13: 1.0, 14: 1.0, 15: 1.0, 16: 2.0, 17: 1.0, 18: 1.0, 19: 1.0}]

    a = random_lora(MODULES, 4, 4.0, seed=4)
    out = tmp_path / "lbw.safetensors"
    sdxl_merge_lora.main(["--save_to", str(out), "--models", write(tmp_path / "a.safetensors", a), "--ratios", "1",
                          "--lbws", "[0.5,0.25,1,1,1,1,1,1,2,1,1,1]"])
    merged = load(out)
    # Both factors take the block weight, so each delta scales by its square.
    for name, weight in zip(MODULES, (0.25, 2, 0.25, 0.25, 0.5, 0.5)):
        np.testing.assert_allclose(delta(merged, name), delta(a, name) * weight ** 2, rtol=1e-5, atol=1e-7)


def test_different_ranks_need_concat_and_bad_lists_are_one_line(tmp_path, capsys):
    path_a = write(tmp_path / "a.safetensors", random_lora(MODULES[:1], 4, 4.0, seed=0))
    path_c = write(tmp_path / "c.safetensors", random_lora(MODULES[:1], 2, 1.0, seed=0))
    out = str(tmp_path / "out.safetensors")
    for args in (["--models", path_a, path_c, "--ratios", "1", "1"],
                 ["--models", path_a, "--ratios", "1", "1"],
                 ["--models", path_a, "--ratios", "1", "--lbws", "[1,1]"],
                 ["--models", path_a, "--ratios", "1", "--precision", "fp8"]):
        with pytest.raises(SystemExit) as exit_info:
            sdxl_merge_lora.main(["--save_to", out] + args)
        assert exit_info.value.code == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 4
    assert "merge only with --concat" in errors[0]
    assert "--ratios: give one ratio per model (1 models, 2 ratios)" in errors[1]
    assert "--lbws: all lists must have the same length, one of 12, 17, 20, 26" in errors[2]
    assert "--precision fp8: unknown precision" in errors[3]
    assert not os.path.exists(out)


# ---- LoRAs into a checkpoint ---------------------------------------------------------------------


def test_loras_merged_into_the_checkpoint_change_exactly_their_weights(tiny_sdxl_files, tmp_path):
    torch_made = random_lora(MODULES, 4, None, seed=5, dtype=np.float16)  # old style: no alpha
    kohya = random_lora(MODULES[2:], 8, 4.0, seed=6)
    path_a = write(tmp_path / "a.safetensors", renamed(torch_made, DIFFUSERS_NAMES))
    path_b = write(tmp_path / "b.safetensors", kohya, {"modelspec.title": "Kohya B"})
    out = tmp_path / "merged.safetensors"
    sdxl_merge_lora.main(["--sd_model", tiny_sdxl_files["single"], "--save_to", str(out), "--models", path_a, path_b,
                          "--ratios", "0.7", "-0.4", "--lbws", "[1,1,1,1,1,1,1,1,1,1,1,1]",
                          "[1,0.5,1,1,1,1,1,1,1,1,1,1]"])

    base, merged = load(tiny_sdxl_files["single"]), load(out)
    assert set(merged) == set(base)
    specs = tiny_modules()
    changed = set()
    for name in MODULES:
        expected = stored_weight(base, specs[name]).astype(np.float64) + delta(torch_made, name, 0.7)
        if name in MODULES[2:]:
            block_weight = 0.5 if "input_blocks_4" in name else 1.0  # IN04 is the second 12-preset value
            expected += delta(kohya, name, -0.4 * block_weight)
        np.testing.assert_allclose(stored_weight(merged, specs[name]), expected, rtol=1e-5, atol=1e-5, err_msg=name)
        changed.add(name)
    fused_k = "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"
    rows = base[fused_k].shape[0] // 3
    np.testing.assert_array_equal(merged[fused_k][:rows], base[fused_k][:rows])  # q untouched
    np.testing.assert_array_equal(merged[fused_k][2 * rows:], base[fused_k][2 * rows:])  # v untouched
    adapted = {f"model.diffusion_model.{specs[n].path}.weight" for n in changed if specs[n].root == "unet"}
    adapted |= {f"conditioner.embedders.0.transformer.{specs[n].path}.weight"
                for n in changed if specs[n].root == "te1"}
    adapted.add(fused_k)
    for key in set(base) - adapted:
        np.testing.assert_array_equal(merged[key], base[key], err_msg=key)

    metadata = safe_open(str(out), "numpy").metadata()
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert metadata["modelspec.merged_from"] == "tiny, a, Kohya B"
    assert metadata["modelspec.title"] == "merged"


def test_half_precision_merge_rounds_the_whole_model_as_sd_scripts(tiny_sdxl_files, tmp_path):
    lora = random_lora(MODULES[:1], 4, 2.0, seed=9)
    out = tmp_path / "merged_fp16.safetensors"
    sdxl_merge_lora.main(["--sd_model", tiny_sdxl_files["single"], "--save_to", str(out), "--models",
                          write(tmp_path / "lora.safetensors", lora), "--ratios", "1", "--precision", "fp16"])
    base, merged = load(tiny_sdxl_files["single"]), load(out)
    assert {value.dtype for value in merged.values()} == {np.dtype(np.float16)}  # saved in the merge precision
    key = "model.diffusion_model.out.2.weight"
    np.testing.assert_array_equal(merged[key], base[key].astype(np.float16))
    adapted = stored_weight(merged, tiny_modules()[MODULES[0]])
    rounded_base = stored_weight(base, tiny_modules()[MODULES[0]]).astype(np.float16).astype(np.float64)
    expected = rounded_base + delta(lora, MODULES[0])
    np.testing.assert_allclose(adapted, expected, rtol=2e-3, atol=2e-3)


def test_merged_checkpoint_computes_what_the_live_lora_computes(tiny_sdxl_files, tmp_path):
    lora_path = write(tmp_path / "lora.safetensors", random_lora(MODULES, 4, 2.0, seed=7))
    out = tmp_path / "merged.safetensors"
    sdxl_merge_lora.main(["--sd_model", tiny_sdxl_files["diffusers"], "--save_to", str(out), "--models", lora_path,
                          "--ratios", "0.8"])
    merged = load_sdxl(str(out))
    live = load_sdxl(tiny_sdxl_files["single"])
    network, weights = create_network_from_weights(0.8, lora_path, None, live.text_encoders, live.unet)
    network.apply_to(live.text_encoders, live.unet)
    assert network.load_state_dict(weights) == []

    rng = np.random.default_rng(8)
    ids = Tensor(np.array([[49406, 320, 1125, 539, 49407] + [49407] * 72], np.int32))
    for index in range(2):
        outputs = [models.text_encoders[index](ids, return_dict=False)[0].asnumpy() for models in (merged, live)]
        np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-4, atol=1e-4)
    # The UNet blocks MODULES adapts (a whole tiny UNet call takes seconds in PyNative on CPU).
    emb = Tensor(rng.standard_normal((1, TINY_UNET.time_embed_dim)).astype(np.float32))
    context = Tensor(rng.standard_normal((1, 77, TINY_UNET.context_dim)).astype(np.float32))
    for block in ("input_blocks", 4), ("output_blocks", 2):
        channels = getattr(merged.unet, block[0])[block[1]][0].in_layers[2].weight.shape[1]
        x = Tensor(rng.standard_normal((1, channels, 4, 4)).astype(np.float32))
        with_lora = [getattr(models.unet, block[0])[block[1]](x, emb, context).asnumpy() for models in (merged, live)]
        np.testing.assert_allclose(with_lora[0], with_lora[1], rtol=1e-4, atol=1e-4, err_msg=str(block))
        network.set_multiplier(0.0)
        without_lora = getattr(live.unet, block[0])[block[1]](x, emb, context).asnumpy()
        network.set_multiplier(0.8)
        assert np.abs(without_lora - with_lora[0]).max() > 1e-3
