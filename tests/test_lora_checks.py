"""networks/check_lora_weights.py and networks/check_compat.py on hand-made files: statistics against
numpy, dead and exploded modules flagged, and each kind of key other loaders treat differently."""

import numpy as np
import pytest

from lora_tool_files import DIFFUSERS_NAMES, MODULES, random_lora, renamed, run_tool, write
from networks import check_compat, check_lora_weights


# ---- check_lora_weights --------------------------------------------------------------------------


def test_statistics_lines_and_a_dead_module_flagged(tmp_path):
    tensors = random_lora(MODULES, 4, 2.0, seed=0)
    dead = MODULES[2]
    tensors[f"{dead}.lora_up.weight"][:] = 0
    path = write(tmp_path / "dead.safetensors", tensors)
    result = run_tool("check_lora_weights.py", path)
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"number of LoRA modules: {2 * len(MODULES)}"
    down = tensors[f"{MODULES[0]}.lora_down.weight"]
    name, shape, mean, smallest = next(line for line in lines if line.startswith(f"{MODULES[0]}.lora_down")).split(",")
    assert shape == "(4-64)"
    assert np.isclose(float(mean), np.abs(down).mean(), rtol=1e-6)
    assert np.isclose(float(smallest), np.abs(down).min(), rtol=1e-6)
    norm = next(line for line in lines if line.startswith(f"{MODULES[0]}: delta norm"))
    up = tensors[f"{MODULES[0]}.lora_up.weight"].astype(np.float64)
    assert np.isclose(float(norm.split()[-1]), np.linalg.norm(up @ down * 2.0 / 4), rtol=1e-5)
    assert [line for line in lines if line.startswith(("dead:", "exploded:"))] == [
        f"dead: {dead} (lora_up is all zero: the module changes nothing)"]


def test_exploded_and_non_finite_modules_are_flagged_and_a_healthy_file_is_not(tmp_path):
    tensors = random_lora(MODULES, 4, 2.0, seed=1)
    healthy = check_lora_weights.check(write(tmp_path / "ok.safetensors", tensors))
    assert healthy.flagged == []
    tensors[f"{MODULES[0]}.lora_up.weight"] *= 1e4
    tensors[f"{MODULES[1]}.lora_down.weight"][0, 0] = np.nan
    report = check_lora_weights.check(write(tmp_path / "bad.safetensors", tensors), show_all_keys=True)
    assert [line.split(" (")[0] for line in report.flagged] == [f"exploded: {MODULES[0]}", f"exploded: {MODULES[1]}"]
    assert "non-finite" in report.flagged[1]
    assert report.lines[1] == f"number of all modules: {3 * len(MODULES)}"  # alphas shown too


def test_a_file_without_lora_tensors_is_one_line(tmp_path, capsys):
    path = write(tmp_path / "model.safetensors", {"model.diffusion_model.out.2.weight": np.zeros((4, 4), np.float32)})
    with pytest.raises(SystemExit) as exit_info:
        check_lora_weights.main([path])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: {path}: no LoRA tensors in this file (is it a LoRA?)\n"


# ---- check_compat --------------------------------------------------------------------------------


def compat(tmp_path, tiny_sdxl_files, tensors, metadata=None, layout="single"):
    path = write(tmp_path / "lora.safetensors", tensors, metadata)
    return check_compat.check_compat(path, tiny_sdxl_files[layout])


def test_a_clean_file_loads_everywhere_and_its_blocks_are_summarised(tmp_path, tiny_sdxl_files):
    tensors = random_lora(MODULES, 8, 4.0, seed=2)
    path = write(tmp_path / "clean.safetensors", tensors, {"ss_network_module": "networks.lora", "ss_network_dim": "8",
                                                           "ss_network_alpha": "4.0", "ss_steps": "1200"})
    result = run_tool("check_compat.py", path, "--model", tiny_sdxl_files["diffusers"])
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert "  tensors: 18 (18 F32)" in lines
    assert "  ss_steps: 1200" in lines and "  ss_network_dim: 8" in lines
    blocks = {line.split()[0]: line.split()[1:] for line in lines if line.startswith("  ") and "modules  rank" in line}
    # MODULES: one module in each text encoder, three in input_blocks.4, one in output_blocks.2.
    assert blocks == {"TE1": ["1", "modules", "rank", "8", "alpha", "4"],
                      "TE2": ["1", "modules", "rank", "8", "alpha", "4"],
                      "input_blocks.4": ["3", "modules", "rank", "8", "alpha", "4"],
                      "output_blocks.2": ["1", "modules", "rank", "8", "alpha", "4"]}
    assert lines[-3:] == ["  this trainer: loads", "  sd-scripts networks.lora: loads every tensor",
                          "  ComfyUI: loads every tensor"]


def test_a_torch_made_file_with_diffusers_names_and_no_alpha_loads(tmp_path, tiny_sdxl_files):
    tensors = renamed(random_lora(MODULES, 4, None, seed=3, dtype=np.float16), DIFFUSERS_NAMES)
    report = compat(tmp_path, tiny_sdxl_files, tensors, layout="diffusers")
    assert not report.stops_loading
    text = "\n".join(report.lines)
    assert "  tensors: 12 (12 F16)" in text
    assert "Note: 8 key(s) are diffusers-layout UNet module names" in text
    assert "skipped by sdxl_merge_lora.py" in text and "ComfyUI: loaded" in text
    assert "input_blocks.4" in text and "alpha none (= rank)" in text
    assert "  this trainer: loads" in text


@pytest.mark.parametrize("extra,kind,comfyui", [
    ({"lora_te2_text_projection.lora_down.weight": (4, 128), "lora_te2_text_projection.lora_up.weight": (128, 4)},
     "text_projection LoRA", "applied to the text encoder's text_projection"),
    ({"lora_unet_input_blocks_4_1_proj_inn.lora_down.weight": (4, 64),
      "lora_unet_input_blocks_4_1_proj_inn.lora_up.weight": (64, 4)},
     "modules this SDXL model does not have", "ignored ('lora key not loaded')"),
    ({f"{MODULES[0]}.hada_w1_a": (64, 4), f"{MODULES[0]}.dora_scale": (1, 64)},
     "LyCORIS tensors", "loaded"),
    ({"unet.down_blocks.1.attentions.0.proj_in.lora_A.weight": (4, 64)}, "diffusers/PEFT-format keys", "loaded"),
    ({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": (4, 768)},
     "keys without an SDXL Kohya prefix", "ignored ('lora key not loaded')"),
])
def test_keys_that_would_not_load_are_named_with_what_each_loader_does(tmp_path, tiny_sdxl_files, extra, kind,
                                                                       comfyui):
    tensors = random_lora(MODULES, 4, 4.0, seed=4)
    tensors.update({key: np.zeros(shape, np.float32) for key, shape in extra.items()})
    report = compat(tmp_path, tiny_sdxl_files, tensors)
    assert report.stops_loading
    problem = next(index for index, line in enumerate(report.lines) if line.startswith("Problem:"))
    assert f"{len(extra)} key(s) are {kind}" in report.lines[problem]
    assert sorted(extra)[0] in report.lines[problem]
    assert report.lines[problem + 1].endswith(f"ComfyUI: {comfyui}")
    assert "  this trainer: does not load: " in "\n".join(report.lines)


def test_wrong_shapes_and_the_default_sdxl_base_config(tmp_path, tiny_sdxl_files, capsys):
    tensors = random_lora(MODULES[:1], 4, 4.0, seed=5)
    tensors[f"{MODULES[0]}.lora_up.weight"] = np.zeros((32, 4), np.float32)  # to_q's output is 64
    report = compat(tmp_path, tiny_sdxl_files, tensors)
    assert report.stops_loading
    assert f"  {MODULES[0]}: lora_down [4, 64] / lora_up [32, 4] do not fit the model's weight [64, 64]" in report.lines

    # Without --model the module table is SDXL base's: 640 channels in input_blocks.4.
    full_size = {"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": np.zeros((8, 640), np.float16),
                 "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": np.zeros((640, 8), np.float16),
                 "lora_unet_input_blocks_4_1_proj_in.alpha": np.array(4.0, np.float16)}
    path = write(tmp_path / "full.safetensors", full_size)
    check_compat.main([path])  # returns: exit code 0
    out = capsys.readouterr().out
    assert "checked against: SDXL base configuration (configs/sdxl_base)" in out and "  this trainer: loads" in out


def test_not_a_lora_is_one_line(tmp_path, capsys):
    path = write(tmp_path / "model.safetensors", {"model.diffusion_model.out.2.weight": np.zeros((4, 4), np.float32)})
    for argv in ([path], [str(tmp_path / "lora.ckpt")]):
        with pytest.raises(SystemExit) as exit_info:
            check_compat.main(argv)
        assert exit_info.value.code == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 2 and "is a pickle checkpoint" in errors[1]
