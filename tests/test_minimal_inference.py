"""sdxl_minimal_inference.py on the tiny SDXL: Kohya LoRAs merged over the whole model, --prompt2,
original size / crop conditioning, PNG parameters and file names.

The samplers are module fixtures because compiling the tiny UNet takes tens of seconds on CPU; a
second ms.jit of the same UNet reuses the compiled graph, so the written-out loops cost no compile.
"""

import datetime
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import mindspore as ms

import sdxl_minimal_inference
from library.samplers import make_sampler, run_sampler
from library.sampling import SDXLSampler
from library.tokenizers import load_sdxl_tokenizers
from networks import lora
from sdxl_minimal_inference import generation_params, main, merge_loras, setup_parser
from tools.make_tiny_sdxl import make_tiny_sdxl

MULTIPLIER = 0.8
# Not square and not the target size, so a swapped height/width or a dropped value shows in y.
CLI_SIZES = ["--target_width", "64", "--target_height", "96", "--original_width", "1024",
             "--original_height", "768", "--crop_top", "16", "--crop_left", "48"]


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    """A random LoRA on every module sd-scripts can adapt: both text encoders and the whole UNet, 3x3 convs too."""
    models = make_tiny_sdxl(seed=0)
    np.random.seed(3)
    network = lora.create_network(1.0, 4, 2, models.vae, models.text_encoders, models.unet, conv_dim="4",
                                  conv_alpha="2")
    assert len(network.loras) == len(network.all_targets)
    assert {name.split("_")[1] for name in (m.lora_name for m in network.loras)} == {"te1", "te2", "unet"}
    rng = np.random.default_rng(4)
    state = {k: (rng.standard_normal(v.shape).astype(np.float32) * 0.2 if k.endswith("lora_up.weight") else v)
             for k, v in network.state_dict().items()}
    network.load_state_dict(state)
    path = tmp_path_factory.mktemp("lora") / "random.safetensors"
    network.save_weights(str(path), np.float32, {})
    return str(path)


@pytest.fixture(scope="module")
def tokenizers():
    return load_sdxl_tokenizers()


@pytest.fixture(scope="module")
def merged_sampler(lora_file, tokenizers):
    models = make_tiny_sdxl(seed=0)
    merge_loras(models, [(lora_file, MULTIPLIER)])
    return SDXLSampler(models, tokenizers, default_sampler="euler")


def cli_params(extra=(), prompt="a red circle", prompt2=None, negative_prompt="blurry", seed=5):
    args = setup_parser().parse_args(["--ckpt_path", "unused", "--steps", "3", "--guidance_scale", "4", *extra])
    return generation_params(args, prompt, prompt2, negative_prompt, seed, [])


# ---- An independent SDXL conditioning, straight from the encoders' outputs -----------------------------


def numpy_size_embedding(values):
    """SGM's 256-wide timestep embedding of each number, [cos(v f), sin(v f)] with f = 10000^(-i/128)."""
    freqs = np.exp(-np.log(10000.0) * np.arange(128) / 128)
    return np.concatenate([np.concatenate([np.cos(v * freqs), np.sin(v * freqs)]) for v in values])


def hand_conditioning(models, tokenizers, prompt, prompt2, sizes):
    """sd-scripts' call_text_encoder(prompt, prompt2): TE1's and TE2's penultimate states side by side,
    TE2's projected pooled output, then the size embeddings."""
    def ids(tokenizer, text):
        encoded = tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="np")
        return ms.Tensor(encoded.input_ids.astype(np.int32))

    out1 = models.text_encoder1(ids(tokenizers[0], prompt), output_hidden_states=True, return_dict=True)
    out2 = models.text_encoder2(ids(tokenizers[1], prompt2), output_hidden_states=True, return_dict=True)
    context = np.concatenate([out1.hidden_states[-2].asnumpy(), out2.hidden_states[-2].asnumpy()], axis=-1)
    pooled = out2.text_embeds.asnumpy()
    return context, np.concatenate([pooled, numpy_size_embedding(sizes)[None]], axis=1)


def hand_latents(models, tokenizers, params):
    """Guided euler sampling with the hand-made conditioning, as a written-out loop."""
    sizes = (params.original_height, params.original_width, params.crop_top, params.crop_left,
             params.height, params.width)
    negative = hand_conditioning(models, tokenizers, params.negative_prompt, params.negative_prompt, sizes)
    positive = hand_conditioning(models, tokenizers, params.prompt, params.prompt2, sizes)
    context, y = (ms.Tensor(np.concatenate(pair).astype(np.float32)) for pair in zip(negative, positive))
    unet = ms.jit(models.unet.construct)

    def model(latents, timestep):
        batch = ms.Tensor(np.repeat(latents.astype(np.float32), 2, axis=0))
        uncond, cond = unet(batch, ms.Tensor(np.full(2, timestep, np.float32)), context, y).asnumpy()
        return (uncond + params.scale * (cond - uncond))[None]

    rng = np.random.default_rng(params.seed)
    noise = rng.standard_normal((1, 4, params.height // 8, params.width // 8)).astype(np.float32)
    return run_sampler(make_sampler("euler", params.steps), model, noise, rng)


def assert_close(actual, expected, relative=1e-4):
    np.testing.assert_allclose(actual, expected, rtol=relative, atol=relative * np.abs(expected).max())


# ---- Conditioning --------------------------------------------------------------------------------------


def test_cli_size_defaults_are_the_target_size_and_no_crop():
    params = cli_params(["--target_width", "64", "--target_height", "96"])
    assert (params.original_width, params.original_height, params.crop_top, params.crop_left) == (64, 96, 0, 0)
    assert params.size_conditioning() == (96, 64, 0, 0, 96, 64)
    assert params.prompt2 == "a red circle"
    assert cli_params(CLI_SIZES).size_conditioning() == (768, 1024, 16, 48, 96, 64)


def test_size_conditioning_is_the_sinusoidal_embedding_of_the_six_numbers(merged_sampler, tokenizers):
    params = cli_params(CLI_SIZES, prompt2="a blue square")
    context, y = merged_sampler.conditioning(params)
    for row, (prompt, prompt2) in enumerate([("blurry", "blurry"), ("a red circle", "a blue square")]):
        _, expected = hand_conditioning(merged_sampler.models, tokenizers, prompt, prompt2,
                                        (768, 1024, 16, 48, 96, 64))
        assert_close(y[row], expected[0])
    size_part = y[:, -6 * 256:]
    # Each number lands in its own 256-wide slot: original h, original w, crop top, crop left, target h, target w.
    assert_close(size_part[:, 256:512], np.tile(numpy_size_embedding([1024]), (2, 1)))
    assert_close(size_part[:, 512:768], np.tile(numpy_size_embedding([16]), (2, 1)))
    _, default_y = merged_sampler.conditioning(cli_params(["--target_width", "64", "--target_height", "96"],
                                                          prompt2="a blue square"))
    np.testing.assert_array_equal(default_y[:, :-6 * 256], y[:, :-6 * 256])  # the pooled text is unchanged
    assert_close(default_y[:, -6 * 256:], np.tile(numpy_size_embedding([96, 64, 0, 0, 96, 64]), (2, 1)))


def test_prompt2_feeds_text_encoder_2_only_and_matches_the_hand_made_run(merged_sampler, tokenizers):
    models = merged_sampler.models
    params = cli_params(CLI_SIZES, prompt2="a blue square")
    same = cli_params(CLI_SIZES)
    context, _ = merged_sampler.conditioning(params)
    same_context, _ = merged_sampler.conditioning(same)
    width1 = models.text_encoder1.config.hidden_size
    np.testing.assert_array_equal(context[:, :, :width1], same_context[:, :, :width1])
    assert np.abs(context[1, :, width1:] - same_context[1, :, width1:]).max() > 1e-2
    np.testing.assert_array_equal(context[0], same_context[0])  # the negative prompt goes to both encoders
    hand_context, _ = hand_conditioning(models, tokenizers, "a red circle", "a blue square", (0,) * 6)
    assert_close(context[1], hand_context[0])

    latents = merged_sampler.generate_latents(params)
    assert_close(latents, hand_latents(models, tokenizers, params))
    assert np.abs(latents - merged_sampler.generate_latents(same)).max() > 1e-2 * np.abs(latents).max()


# ---- LoRA: merged weights against live LoRA modules ----------------------------------------------------


def test_merged_lora_renders_what_live_lora_modules_render(merged_sampler, lora_file, tokenizers):
    models = make_tiny_sdxl(seed=0)
    network, weights = lora.create_network_from_weights(MULTIPLIER, lora_file, None, models.text_encoders,
                                                        models.unet)
    network.apply_to(models.text_encoders, models.unet)
    assert network.load_state_dict(weights) == []
    assert len(network.loras) == len(network.all_targets)
    live_sampler = SDXLSampler(models, tokenizers, default_sampler="euler")
    params = cli_params(CLI_SIZES, prompt2="a blue square")

    live_context, live_y = live_sampler.conditioning(params)
    merged_context, merged_y = merged_sampler.conditioning(params)
    assert_close(live_context, merged_context)
    assert_close(live_y, merged_y)
    merged_latents = merged_sampler.generate_latents(params)
    assert_close(live_sampler.generate_latents(params), merged_latents)

    network.set_multiplier(0.0)  # the base model: the LoRA must matter in both encoders and the UNet
    base_context, _ = live_sampler.conditioning(params)
    width1 = models.text_encoder1.config.hidden_size
    for columns in (slice(None, width1), slice(width1, None)):
        assert np.abs(base_context[..., columns] - merged_context[..., columns]).max() > 1e-2
    base_latents = live_sampler.generate_latents(params)
    assert np.abs(base_latents - merged_latents).max() > 1e-2 * np.abs(merged_latents).max()


# ---- The command line ----------------------------------------------------------------------------------


class FrozenClock(datetime.datetime):
    @classmethod
    def now(cls, tz=None):
        return cls(2024, 1, 2, 3, 4, 5)


def test_interactive_run_saves_every_image_with_its_parameters(tiny_sdxl_files, lora_file, merged_sampler,
                                                               tmp_path, monkeypatch):
    # prompt, prompt2, negative prompt, seed -- as sd-scripts asks; empty answers take the command line's.
    answers = iter(["a red circle", "a blue square", "", "5",
                    "a red circle", "a blue square", "", "5",
                    "a red circle", "", "", "",
                    ""])
    monkeypatch.setattr("builtins.input", lambda _: next(answers))
    monkeypatch.setattr(sdxl_minimal_inference, "datetime", FrozenClock)
    out = tmp_path / "out"
    main(["--ckpt_path", tiny_sdxl_files["single"], "--lora_weights", f"{lora_file};{MULTIPLIER}", "--steps", "3",
          "--guidance_scale", "4", "--negative_prompt", "blurry", "--seed", "5", "--interactive",
          "--output_dir", str(out), *CLI_SIZES])

    names = ["image_20240102-030405_000.png", "image_20240102-030405_000_1.png", "image_20240102-030405_000_2.png"]
    assert sorted(p.name for p in out.iterdir()) == names  # same second, nothing overwritten
    images = [Image.open(out / name) for name in names]
    pixels = [np.asarray(image.convert("RGB")).astype(int) for image in images]
    assert images[0].text["parameters"] == (
        f"a red circle <lora:random.safetensors:{MULTIPLIER:g}>\n"
        "Negative prompt: blurry\n"
        'Steps: 3, Sampler: Euler, CFG scale: 4, Seed: 5, Size: 64x96, Prompt 2: "a blue square", '
        "Original size: 1024x768, Crop top: 16, Crop left: 48"
    )
    assert 'Prompt 2: "a red circle"' in images[2].text["parameters"]
    assert pixels[0].shape == (96, 64, 3)
    np.testing.assert_array_equal(pixels[0], pixels[1])
    assert np.abs(pixels[0] - pixels[2]).mean() > 1.0

    # The script's image is the sampler's for the same parameters, LoRA merged at the given multiplier.
    expected = merged_sampler.decode(merged_sampler.generate_latents(cli_params(CLI_SIZES, prompt2="a blue square")))
    assert np.abs(pixels[0] - np.asarray(expected).astype(int)).max() <= 1


def test_bad_lora_argument_is_one_line(tiny_sdxl_files, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["--ckpt_path", tiny_sdxl_files["single"], "--lora_weights", str(tmp_path / "none.safetensors;1")])
    assert info.value.code == 2
    assert "none.safetensors: file not found" in capsys.readouterr().err


def test_interactive_seed_must_be_a_number(monkeypatch):
    answers = iter(["a cat", "", "", "five"])
    monkeypatch.setattr("builtins.input", lambda _: next(answers))
    args = SimpleNamespace(negative_prompt="", seed=None)
    with pytest.raises(sdxl_minimal_inference.UserError, match="seed 'five': expected a whole number"):
        list(sdxl_minimal_inference.ask_for_images(args))
