"""networks/resize_lora.py: resized deltas against numpy's SVD of the full delta, the ranks sd-scripts'
dynamic methods pick on a hand-built spectrum, new alphas and metadata, and the command line."""

import numpy as np
import pytest
from safetensors import safe_open

from lora_tool_files import MODULES, delta, load, random_lora, run_tool, tiny_modules, write
from networks import resize_lora

RANK, ALPHA = 8, 4.0
# A 64 x 64 TE1 projection holding exactly these singular values (alpha = rank, so scale 1).
SPECTRUM = np.array([8, 4, 2, 1, 0.5, 0.25, 0.125, 0.0625])
SPECTRAL_MODULE = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"


def relative_error(got, expected):
    return np.linalg.norm(got - expected) / np.linalg.norm(expected)


def spectral_lora(alpha):
    """up = U diag(SPECTRUM), down = V^T with orthonormal U, V: the delta's singular values are SPECTRUM."""
    rng = np.random.default_rng(3)
    u, _ = np.linalg.qr(rng.standard_normal((64, RANK)))
    v, _ = np.linalg.qr(rng.standard_normal((64, RANK)))
    return {f"{SPECTRAL_MODULE}.lora_down.weight": v.T.astype(np.float32),
            f"{SPECTRAL_MODULE}.lora_up.weight": (u * SPECTRUM).astype(np.float32),
            f"{SPECTRAL_MODULE}.alpha": np.array(alpha, np.float32)}


def test_resizing_to_the_same_rank_reproduces_every_delta(tmp_path):
    tensors = random_lora(MODULES, RANK, ALPHA, seed=0)
    source = write(tmp_path / "in.safetensors", tensors, {"ss_training_comment": "trained", "format": "pt"})
    resize_lora.main(["--model", source, "--save_to", str(tmp_path / "out.safetensors"), "--new_rank", "8"])
    resized = load(tmp_path / "out.safetensors")
    for name in MODULES:
        assert resized[f"{name}.lora_down.weight"].shape == tensors[f"{name}.lora_down.weight"].shape
        assert float(resized[f"{name}.alpha"]) == ALPHA  # scale alpha / rank is kept: 4 / 8 * 8
        assert relative_error(delta(resized, name), delta(tensors, name)) < 1e-4, name
    metadata = safe_open(str(tmp_path / "out.safetensors"), "numpy").metadata()
    assert metadata["ss_training_comment"] == "dimension is resized from 8 to 8; trained"
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("8", "4.0")
    assert metadata["format"] == "pt"  # sd-scripts keeps every other metadata entry


def test_lower_rank_is_the_truncated_svd_of_the_delta(tmp_path):
    tensors = random_lora(MODULES, RANK, ALPHA, seed=1)
    source = write(tmp_path / "in.safetensors", tensors)
    resize_lora.main(["--model", source, "--save_to", str(tmp_path / "out.safetensors"), "--new_rank", "3",
                      "--new_conv_rank", "2", "--save_precision", "float"])
    resized = load(tmp_path / "out.safetensors")
    specs = tiny_modules()
    for name in MODULES:
        full = delta(tensors, name)
        u, s, vh = np.linalg.svd(full.reshape(full.shape[0], -1))
        rank = 2 if len(specs[name].shape) == 4 else 3  # every Conv2d, 1x1 too, takes --new_conv_rank
        truncated = ((u[:, :rank] * s[:rank]) @ vh[:rank]).reshape(full.shape)
        assert resized[f"{name}.lora_down.weight"].shape[0] == rank
        assert float(resized[f"{name}.alpha"]) == ALPHA / RANK * rank
        assert relative_error(delta(resized, name), truncated) < 1e-4, name
        assert relative_error(delta(resized, name), full) > 0.05  # a real truncation
    metadata = safe_open(str(tmp_path / "out.safetensors"), "numpy").metadata()
    assert metadata["ss_training_comment"] == "dimension is resized from 8 to 3 (conv: 2); "
    # The last module in name order (a TE2 projection, rank 3) gives sd-scripts' recorded alpha.
    assert metadata["ss_network_alpha"] == "1.5"


@pytest.mark.parametrize("method,param,max_rank,expected_rank", [
    # S[0] / 20 = 0.4: five values above it (8, 4, 2, 1, 0.5), and sd-scripts adds one.
    ("sv_ratio", 20.0, 8, 6),
    # cumulative sums / 15.9375: 0.502, 0.753, 0.878, 0.941 first reaches 0.9 at index 3; +1 +1.
    ("sv_cumulative", 0.9, 8, 5),
    # squared sums / 85.332: 0.750, 0.938, 0.984 first reaches 0.99^2 = 0.9801 at index 2; +1 +1.
    ("sv_fro", 0.99, 8, 4),
    # --new_rank caps the dynamic choice.
    ("sv_ratio", 20.0, 3, 3),
])
def test_dynamic_methods_pick_sd_scripts_rank_for_a_known_spectrum(tmp_path, capsys, method, param, max_rank,
                                                                  expected_rank):
    tensors = spectral_lora(alpha=4.0)
    source = write(tmp_path / "in.safetensors", tensors)
    resize_lora.main(["--model", source, "--save_to", str(tmp_path / "out.safetensors"), "--new_rank", str(max_rank),
                      "--dynamic_method", method, "--dynamic_param", str(param), "--verbose"])
    resized = load(tmp_path / "out.safetensors")
    assert resized[f"{SPECTRAL_MODULE}.lora_down.weight"].shape == (expected_rank, 64)
    assert float(resized[f"{SPECTRAL_MODULE}.alpha"]) == 0.5 * expected_rank
    fro_kept = np.sqrt(np.sum(SPECTRUM[:expected_rank] ** 2) / np.sum(SPECTRUM ** 2))
    output = capsys.readouterr().out
    assert f"fro retained: {fro_kept:.1%}" in output
    assert f"dynamic | dim: {expected_rank}, alpha: {0.5 * expected_rank}" in output
    metadata = safe_open(str(tmp_path / "out.safetensors"), "numpy").metadata()
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("Dynamic", "Dynamic")
    assert metadata["ss_training_comment"] == f"Dynamic resize with {method}: {param} from 8; "


def test_a_zero_module_becomes_rank_one(tmp_path):
    tensors = spectral_lora(alpha=8.0)
    tensors[f"{SPECTRAL_MODULE}.lora_up.weight"][:] = 0
    source = write(tmp_path / "in.safetensors", tensors)
    resize_lora.main(["--model", source, "--save_to", str(tmp_path / "out.safetensors"), "--new_rank", "4"])
    resized = load(tmp_path / "out.safetensors")
    assert resized[f"{SPECTRAL_MODULE}.lora_down.weight"].shape == (1, 64)
    assert not resized[f"{SPECTRAL_MODULE}.lora_up.weight"].any()


def test_command_line_writes_the_save_precision_with_hashes_of_the_saved_bytes(tmp_path):
    from library.model_hashes import precalculate_lora_hashes

    source = write(tmp_path / "in.safetensors", random_lora(MODULES, RANK, None, seed=2, dtype=np.float16))
    result = run_tool("resize_lora.py", "--model", source, "--save_to", tmp_path / "out.safetensors",
                      "--new_rank", "4", "--save_precision", "fp16", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    with safe_open(str(tmp_path / "out.safetensors"), "numpy") as handle:
        assert {handle.get_slice(key).get_dtype() for key in handle.keys()} == {"F16"}
        metadata = handle.metadata()
    saved = load(tmp_path / "out.safetensors")
    assert (metadata["sshs_model_hash"], metadata["sshs_legacy_hash"]) == precalculate_lora_hashes(saved, metadata)
    assert metadata["ss_network_alpha"] == "4.0"  # no alpha in the file: scale 1


@pytest.mark.parametrize("args,message", [
    (["--dynamic_method", "sv_max", "--dynamic_param", "0.9"], "--dynamic_method sv_max: unknown method"),
    (["--dynamic_method", "sv_fro"], "needs a positive --dynamic_param"),
    (["--device", "cuda"], "--device cuda: this tool computes on the CPU"),
    (["--save_precision", "fp8"], "--save_precision fp8: unknown precision"),
])
def test_bad_arguments_give_one_line(tmp_path, capsys, args, message):
    source = write(tmp_path / "in.safetensors", random_lora(MODULES[:1], 4, 1.0, seed=0))
    with pytest.raises(SystemExit) as exit_info:
        resize_lora.main(["--model", source, "--save_to", str(tmp_path / "out.safetensors")] + args)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and message in error


def test_files_that_are_not_plain_lora_give_one_line(tmp_path, capsys):
    tensors = random_lora(MODULES[:1], 4, 1.0, seed=0)
    tensors[f"{MODULES[0]}.hada_w1_a"] = np.zeros((4, 4), np.float32)
    source = write(tmp_path / "lycoris.safetensors", tensors)
    for model in (source, str(tmp_path / "missing.safetensors")):
        with pytest.raises(SystemExit):
            resize_lora.main(["--model", model, "--save_to", str(tmp_path / "out.safetensors")])
    errors = capsys.readouterr().err.splitlines()
    assert "LyCORIS tensor" in errors[0] and "file not found" in errors[1]
