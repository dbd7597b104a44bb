"""networks/extract_lora_from_models.py and what it stands on: the SDXL LoRA module table built from
configs (held to sd-scripts' key list and to lora.py's walk of the cells), base weights read from
both checkpoint layouts, and known low-rank changes recovered from two tiny SDXL checkpoints."""

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from library.model_configs import sdxl_base_configs
from library.model_loading import load_sdxl
from lora_tool_files import delta, load, run_tool, stored_weight, tiny_modules, write
from networks import extract_lora_from_models as extract
from networks.checkpoint_weights import SDXLCheckpointWeights
from networks.lora import create_network_from_weights, lora_targets
from networks.sdxl_lora_modules import sdxl_lora_modules

REFERENCE = Path(__file__).parent / "reference"
# Changed in the tuned checkpoint: cross-attention to_k, a 3x3 conv, TE1 fc1 and TE2's k (fused in_proj).
CHANGED = ["lora_unet_output_blocks_2_1_transformer_blocks_0_attn2_to_k", "lora_unet_input_blocks_4_0_in_layers_2",
           "lora_te1_text_model_encoder_layers_0_mlp_fc1", "lora_te2_text_model_encoder_layers_1_self_attn_k_proj"]


def read_tsv(name):
    shapes = {}
    for line in (REFERENCE / name).read_text().splitlines()[1:]:
        key, shape, _ = line.split("\t")
        shapes[key] = tuple(json.loads(shape))
    return shapes


@pytest.fixture(scope="module")
def tiny_models(tiny_sdxl_files):
    return load_sdxl(tiny_sdxl_files["single"])


def balanced_vectors(length, count):
    """`count` orthonormal vectors of +-1/sqrt(length) entries, half of each sign: Sylvester Hadamard
    columns (not the all-ones first) tiled to `length`."""
    size = length & -length  # the largest power of two dividing length
    hadamard = np.ones((1, 1))
    while hadamard.shape[0] < size:
        hadamard = np.block([[hadamard, hadamard], [hadamard, -hadamard]])
    return np.tile(hadamard[:, 1:count + 1], (length // size, 1)) / np.sqrt(length)


def low_rank_change(shape, singular_values):
    """U diag(S) V^T with balanced U and V: whatever signs an SVD gives its vectors, the factors' values
    are symmetric about zero, so sd-scripts' quantile clamp (at +-quantile, not of |values|) keeps them."""
    u = balanced_vectors(shape[0], len(singular_values))
    v = balanced_vectors(int(np.prod(shape[1:])), len(singular_values))
    return ((u * singular_values) @ v.T).reshape(shape).astype(np.float32)


def tuned_checkpoint(base_path, path, changes):
    """The base single file with `changes` ({module: delta}) added to the stored weights."""
    checkpoint = load(base_path)
    specs = tiny_modules()
    for name, change in changes.items():
        stored_weight(checkpoint, specs[name])[...] += change
    return write(path, checkpoint)


# ---- The module table ----------------------------------------------------------------------------


def test_module_table_of_sdxl_base_is_sd_scripts_key_list():
    unet, _, te1, te2 = sdxl_base_configs()
    table = sdxl_lora_modules(unet, te1, te2)
    reference = {}
    for key, shape in read_tsv("sdxl-lora-rank8-unet-te-keys.tsv").items():
        module, _, part = key.partition(".")
        reference.setdefault(module, {})[part] = shape
    expected = {name: (parts["lora_up.weight"][0], parts["lora_down.weight"][1]) for name, parts in reference.items()}
    assert {name: spec.shape for name, spec in table.items() if not spec.in_conv_block} == expected

    # With conv_dim: 6 input and 2 middle ResBlocks (3 convs/linears each, +1 skip where 320->640 and
    # 640->1280), 9 output ResBlocks (all with a skip), 2 downsamplers and 2 upsamplers.
    conv_block = [spec for spec in table.values() if spec.in_conv_block]
    assert len(conv_block) == (6 * 3 + 2) + 2 * 3 + 9 * 4 + 2 + 2
    base = read_tsv("sdxl-base-single-file-keys.tsv")
    for spec in conv_block:
        assert base[f"model.diffusion_model.{spec.path}.weight"] == spec.shape, spec.lora_name


def test_module_table_is_what_lora_py_finds_in_the_cells(tiny_models):
    walked = {t.lora_name: (tuple(t.cell.weight.shape), t.in_conv_block)
              for t in lora_targets(tiny_models.text_encoders, tiny_models.unet)}
    assert {name: (spec.shape, spec.in_conv_block) for name, spec in tiny_modules().items()} == walked


def test_base_weights_read_from_either_layout_are_the_models_weights(tiny_sdxl_files, tiny_models):
    cells = {t.lora_name: t.cell.weight.asnumpy() for t in lora_targets(tiny_models.text_encoders, tiny_models.unet)}
    for layout in ("single", "diffusers"):
        with SDXLCheckpointWeights(tiny_sdxl_files[layout]) as weights:
            assert weights.modules == tiny_modules()
            for name, spec in weights.modules.items():
                np.testing.assert_array_equal(weights.read(spec), cells[name], err_msg=f"{layout} {name}")


# ---- Extraction ----------------------------------------------------------------------------------


def test_extraction_recovers_known_low_rank_changes(tiny_sdxl_files, tiny_models, tmp_path):
    changes = {name: low_rank_change(tiny_modules()[name].shape, [3.0, 2.0, 1.0]) for name in CHANGED}
    tuned = tuned_checkpoint(tiny_sdxl_files["single"], tmp_path / "tuned.safetensors", changes)
    out = tmp_path / "extracted.safetensors"
    result = run_tool("extract_lora_from_models.py", "--sdxl", "--model_org", tiny_sdxl_files["diffusers"],
                      "--model_tuned", tuned, "--save_to", out, "--dim", "3", "--conv_dim", "3",
                      "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "Text encoder is different" in result.stdout

    extracted = load(out)
    # sd-scripts extracts every module (conv blocks with --conv_dim); unchanged ones hold a zero delta.
    assert {key.partition(".")[0] for key in extracted} == set(tiny_modules())
    for name in tiny_modules():
        assert float(extracted[f"{name}.alpha"]) == extracted[f"{name}.lora_down.weight"].shape[0] == 3
        if name in CHANGED:
            error = np.linalg.norm(delta(extracted, name) - changes[name]) / np.linalg.norm(changes[name])
            assert error < 1e-4, name
        else:
            assert not delta(extracted, name).any(), name

    metadata = safe_open(str(out), "numpy").metadata()
    assert {key: metadata[key] for key in metadata if key.startswith("ss_")} == {
        "ss_v2": "False", "ss_base_model_version": "sdxl_base_v1-0", "ss_network_module": "networks.lora",
        "ss_network_dim": "3", "ss_network_alpha": "3.0", "ss_network_args": '{"conv_dim": "3", "conv_alpha": "3.0"}'}
    assert metadata["modelspec.title"] == "extracted"
    network, _ = create_network_from_weights(1.0, str(out), None, tiny_models.text_encoders, tiny_models.unet)
    assert len(network.loras) == len(tiny_modules())


def test_text_encoders_within_min_diff_and_conv_blocks_without_conv_dim_are_left_out(tiny_sdxl_files, tmp_path,
                                                                                      capsys):
    unet_change = low_rank_change(tiny_modules()[CHANGED[0]].shape, [2.0, 1.0])
    small_te_change = low_rank_change(tiny_modules()[CHANGED[2]].shape, [0.5])  # max 0.5 / sqrt(128 * 64) < 0.01
    tuned = tuned_checkpoint(tiny_sdxl_files["single"], tmp_path / "tuned.safetensors",
                             {CHANGED[0]: unet_change, CHANGED[2]: small_te_change})
    out = tmp_path / "unet_only.safetensors"
    extract.main(["--sdxl", "--model_org", tiny_sdxl_files["single"], "--model_tuned", tuned, "--save_to", str(out),
                  "--dim", "2", "--save_precision", "bf16", "--no_metadata"])
    assert "Text encoder is same. Extract U-Net only." in capsys.readouterr().out
    extracted = load(out)
    expected = {name for name, spec in tiny_modules().items() if spec.root == "unet" and not spec.in_conv_block}
    assert {key.partition(".")[0] for key in extracted} == expected
    error = np.linalg.norm(delta(extracted, CHANGED[0]) - unet_change) / np.linalg.norm(unet_change)
    assert error < 1e-2  # bf16 keeps about 3 significant digits
    metadata = safe_open(str(out), "numpy").metadata()
    assert not any(key.startswith("modelspec.") for key in metadata) and metadata["ss_network_args"] == "{}"


def test_one_module_follows_sd_scripts_svd_and_quantile_clamp():
    rng = np.random.default_rng(4)
    diff = (rng.standard_normal((24, 6)) @ rng.standard_normal((6, 8 * 9))).reshape(24, 8, 3, 3).astype(np.float32)
    weights = extract.low_rank_difference(diff, rank=4, clamp_quantile=0.9)

    u, s, vh = np.linalg.svd(diff.reshape(24, -1), full_matrices=False)
    up, down = u[:, :4] * s[:4], vh[:4]
    limit = np.quantile(np.concatenate([up.ravel(), down.ravel()]), 0.9)
    np.testing.assert_allclose(weights.up, np.clip(up, -limit, limit).reshape(24, 4, 1, 1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(weights.down, np.clip(down, -limit, limit).reshape(4, 8, 3, 3), rtol=1e-5, atol=1e-6)
    assert np.isclose(np.abs(weights.up).max(), limit) and weights.alpha == 4
    # The rank never exceeds the layer's input or output channels.
    assert extract.low_rank_difference(np.ones((16, 3, 1, 1), np.float32), 8, 1.0).rank == 3


@pytest.mark.parametrize("args,message", [
    (["--v2", "--sdxl"], "--v2: SD 2.x models are not supported"),
    ([], "--sdxl is required"),
    (["--sdxl", "--device", "cuda"], "--device cuda: this tool computes on the CPU"),
    (["--sdxl", "--load_precision", "half"], "--load_precision half: unknown precision"),
])
def test_bad_arguments_give_one_line(tiny_sdxl_files, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        extract.main(["--model_org", tiny_sdxl_files["single"], "--model_tuned", tiny_sdxl_files["single"],
                      "--save_to", str(tmp_path / "out.safetensors")] + args)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and message in error


def test_models_that_are_not_sdxl_checkpoints_give_one_line(tiny_sdxl_files, tmp_path, capsys):
    not_a_model = write(tmp_path / "lora.safetensors", {"lora_unet_x.alpha": np.array(1.0, np.float32)})
    for original in (str(tmp_path / "missing.safetensors"), not_a_model):
        with pytest.raises(SystemExit):
            extract.main(["--sdxl", "--model_org", original, "--model_tuned", tiny_sdxl_files["single"],
                          "--save_to", str(tmp_path / "out.safetensors")])
    errors = capsys.readouterr().err.splitlines()
    assert "model not found" in errors[0] and "not an SDXL single-file checkpoint" in errors[1]
