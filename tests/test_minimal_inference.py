"""sdxl_minimal_inference.py end to end on the tiny SDXL with a Kohya LoRA merged."""

import numpy as np
import pytest
from PIL import Image

from networks import lora
from sdxl_minimal_inference import main
from tools.make_tiny_sdxl import make_tiny_sdxl


@pytest.fixture(scope="module")
def random_lora(tmp_path_factory):
    models = make_tiny_sdxl(seed=0)
    np.random.seed(3)
    network = lora.create_network(1.0, 4, 4, models.vae, models.text_encoders, models.unet)
    state = network.state_dict()
    rng = np.random.default_rng(4)
    state = {k: (rng.standard_normal(v.shape).astype(np.float32) * 0.3 if k.endswith("lora_up.weight") else v)
             for k, v in state.items()}
    network.load_state_dict(state)
    path = tmp_path_factory.mktemp("lora") / "random.safetensors"
    network.save_weights(str(path), np.float16, {})
    return str(path)


def _render(tmp_path, model, lora_arg, name):
    out = tmp_path / name
    argv = ["--ckpt_path", model, "--prompt", "a red circle", "--steps", "3", "--target_width", "64",
            "--target_height", "64", "--seed", "5", "--guidance_scale", "4", "--output_dir", str(out)]
    main(argv + (["--lora_weights", lora_arg] if lora_arg else []))
    image = Image.open(out / "image_000.png")
    return np.asarray(image.convert("RGB")), image.text["parameters"]


def test_render_with_lora_is_reproducible_and_recorded(tiny_sdxl_files, random_lora, tmp_path):
    model = tiny_sdxl_files["single"]
    first, text = _render(tmp_path, model, f"{random_lora};0.8", "a")
    again, _ = _render(tmp_path, model, f"{random_lora};0.8", "b")
    plain, _ = _render(tmp_path, model, None, "c")
    assert first.shape == (64, 64, 3)
    np.testing.assert_array_equal(first, again)
    assert np.abs(first.astype(int) - plain.astype(int)).max() > 0
    assert "a red circle" in text and "Seed: 5" in text and "random.safetensors:0.8" in text


def test_bad_lora_argument_is_one_line(tiny_sdxl_files, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["--ckpt_path", tiny_sdxl_files["single"], "--lora_weights", str(tmp_path / "none.safetensors;1")])
    assert info.value.code == 2
    assert "none.safetensors: file not found" in capsys.readouterr().err
