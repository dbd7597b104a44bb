import dataclasses
import logging
import os
import time

import numpy as np
import pytest
from PIL import Image

import mindspore as ms

from library.errors import UserError
from library.sample_prompts import SamplePrompt
from library.samplers import make_sampler, run_sampler
from library.sampling import (
    GenerationParams,
    SDXLSampler,
    resolve_params,
    sample_image_name,
    save_sample_image,
    tokenize_weighted,
)
from library.sdxl_unet import SizeEmbedding
from library.text_encoders import SDXLTextEncoding, eos_mask
from library.tokenizers import load_sdxl_tokenizers, tokenize_prompts
from tools.make_tiny_sdxl import make_tiny_sdxl


@pytest.fixture(scope="module")
def tokenizers():
    return load_sdxl_tokenizers()


@pytest.fixture(scope="module")
def models():
    return make_tiny_sdxl(seed=0)


@pytest.fixture(scope="module")
def sampler(models, tokenizers):
    return SDXLSampler(models, tokenizers)


def tiny_prompt(**overrides):
    # Not square, so a swapped height and width would show.
    values = dict(prompt="a red cat", negative_prompt="blurry", width=64, height=96, seed=11, sample_steps=3,
                  scale=5.0, sample_sampler="euler_a")
    return SamplePrompt(**{**values, **overrides})


# ---- Weighted tokens ----------------------------------------------------------------------------------

LONG_PROMPT = ", ".join(f"word{i}" for i in range(60))  # well over 75 tokens


@pytest.mark.parametrize("max_token_length, prompt", [(None, "a photo of a cat"), (None, LONG_PROMPT),
                                                      (150, "a photo of a cat"), (150, LONG_PROMPT)])
def test_plain_prompt_tokens_match_the_unweighted_tokenizer(tokenizers, max_token_length, prompt):
    for tokenizer in tokenizers:
        ids, weights = tokenize_weighted(tokenizer, prompt, max_token_length)
        np.testing.assert_array_equal(ids, tokenize_prompts(tokenizer, [prompt], max_token_length)[0])
        assert weights.shape == (ids.shape[0] * 75 + 2,) and np.all(weights == 1.0)


def test_weights_follow_their_tokens(tokenizers):
    tokenizer = tokenizers[0]
    ids, weights = tokenize_weighted(tokenizer, "a (red:1.5) [cat]", None)
    np.testing.assert_array_equal(ids, tokenize_prompts(tokenizer, ["a red cat"], None)[0])
    assert weights[:6].tolist() == pytest.approx([1.0, 1.0, 1.5, 1 / 1.1, 1.0, 1.0])  # <BOS> a red cat <EOS> pad


def test_weights_in_a_later_chunk(tokenizers):
    tokenizer = tokenizers[1]
    ids, weights = tokenize_weighted(tokenizer, "cat " * 80 + "(dog:2)", 150)
    dog = tokenizer("dog", add_special_tokens=False).input_ids[0]
    # Token 81 of the prompt is position 82 of the joined states and position 7 of the second chunk.
    assert ids.shape == (2, 77) and ids[1, 6] == dog
    assert weights[81] == 2.0 and np.count_nonzero(weights != 1.0) == 1


def test_too_long_prompt_is_cut_with_a_warning(tokenizers, caplog):
    with caplog.at_level(logging.WARNING, logger="library.sampling"):
        ids, weights = tokenize_weighted(tokenizers[0], "(cat:2) " * 100, None)
    assert "prompt truncated to 75 tokens" in caplog.text
    assert ids[0, 0] == tokenizers[0].bos_token_id and ids[0, 76] == tokenizers[0].eos_token_id
    assert weights.tolist() == [1.0] + [2.0] * 75 + [1.0]


def test_attention_weights_scale_the_context_not_the_pooled_vector(sampler):
    (plain, weighted), (plain_pooled, weighted_pooled) = (
        np.split(array, 2) for array in sampler.encode_prompts(["a cat", "a (cat:1.5)"])
    )
    np.testing.assert_allclose(weighted[:, 2], 1.5 * plain[:, 2], rtol=1e-6)  # <BOS> a cat: "cat" at 2
    np.testing.assert_array_equal(np.delete(weighted, 2, axis=1), np.delete(plain, 2, axis=1))
    np.testing.assert_array_equal(weighted_pooled, plain_pooled)


# ---- Rendering ----------------------------------------------------------------------------------------


def test_same_seed_gives_the_same_image_and_another_seed_does_not(sampler):
    first = sampler.render(tiny_prompt())
    again = sampler.render(tiny_prompt())
    other = sampler.render(tiny_prompt(seed=12))
    assert first.image.size == (64, 96) and first.image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(first.image), np.asarray(again.image))
    assert np.abs(np.asarray(first.image, np.int16) - np.asarray(other.image, np.int16)).mean() > 1.0


def reference_latents(models, tokenizers, prompt: SamplePrompt):
    """sd-scripts' SDXL sampling loop, written out: separate conditional and unconditional UNet calls."""
    encode = SDXLTextEncoding(models.text_encoder1, models.text_encoder2)
    unet = ms.jit(models.unet.construct)

    def condition(text):
        ids1 = tokenize_prompts(tokenizers[0], [text], None)[:, 0]
        ids2 = tokenize_prompts(tokenizers[1], [text], None)[:, 0]
        context, pooled = encode(ms.Tensor(ids1), ms.Tensor(ids2), ms.Tensor(eos_mask(ids2)))
        sizes = ms.Tensor(np.array([[96, 64, 0, 0, 96, 64]], np.float32))  # original h w, crop top left, target h w
        return context, SizeEmbedding()(pooled, sizes)

    conditional = condition(prompt.prompt)
    unconditional = condition(prompt.negative_prompt)

    def model(model_input, timestep):
        inputs = (ms.Tensor(model_input.astype(np.float32)), ms.Tensor(np.array([timestep], np.float32)))
        cond = unet(*inputs, *conditional).asnumpy()
        if prompt.scale <= 1.0:
            return cond
        uncond = unet(*inputs, *unconditional).asnumpy()
        return uncond + prompt.scale * (cond - uncond)

    rng = np.random.default_rng(prompt.seed)
    noise = rng.standard_normal((1, 4, 12, 8)).astype(np.float32)
    return run_sampler(make_sampler(prompt.sample_sampler, prompt.sample_steps), model, noise, rng)


@pytest.mark.parametrize("scale", [5.0, 1.0])
def test_latents_match_the_written_out_loop(sampler, models, tokenizers, scale):
    prompt = tiny_prompt(scale=scale, sample_sampler="dpmsolver++", sample_steps=2)
    latents = sampler.generate_latents(resolve_params(prompt, "ddim"))
    expected = reference_latents(models, tokenizers, prompt)
    np.testing.assert_allclose(latents, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_scale_one_never_uses_the_negative_prompt(sampler):
    # Without guidance sd-scripts skips the unconditional pass, so the negative prompt cannot matter.
    params = resolve_params(tiny_prompt(scale=1.0, sample_steps=2), "ddim")
    latents = sampler.generate_latents(params)
    other_negative = sampler.generate_latents(dataclasses.replace(params, negative_prompt="sharp"))
    np.testing.assert_array_equal(latents, other_negative)


def test_sizes_the_unet_cannot_take_are_refused_by_prompt(sampler):
    params = resolve_params(tiny_prompt(width=72), "ddim")  # latents 9 wide: halved twice, not rejoinable
    with pytest.raises(UserError, match=r"sample prompt 'a red cat': size 72x96 .* multiples of 32"):
        sampler.generate_latents(params)


def test_decode_maps_the_vae_range_to_pixels(sampler, models):
    latents = np.random.default_rng(0).standard_normal((1, 4, 12, 8)).astype(np.float32)
    decoded = ms.jit(models.vae.decode)(ms.Tensor(latents / 0.13025)).asnumpy()[0]
    expected = np.round(np.clip(decoded / 2 + 0.5, 0, 1) * 255).transpose(1, 2, 0)
    np.testing.assert_array_equal(np.asarray(sampler.decode(latents)), expected.astype(np.uint8))


# ---- Parameters and files -----------------------------------------------------------------------------


def test_resolve_params_applies_sd_scripts_rules():
    params = resolve_params(SamplePrompt(prompt="p", width=1020, height=60, seed=None), "euler_a", [("style", 0.8)])
    assert (params.width, params.height) == (1016, 64)  # down to a multiple of 8, at least 64
    assert (params.negative_prompt, params.sampler, params.steps, params.scale) == ("", "euler_a", 30, 7.5)
    assert 0 <= params.seed < 2**32 and params.loras == (("style", 0.8),)
    assert resolve_params(SamplePrompt(prompt="p", sample_sampler="heun", seed=4), "ddim").sampler == "heun"


def test_infotext_is_a1111_parameters():
    params = GenerationParams(prompt="a cat", negative_prompt="blurry", width=832, height=1216, steps=28,
                              sampler="euler_a", scale=7.0, seed=42, loras=(("style", 0.8), ("detail", 1.0)))
    assert params.infotext() == (
        "a cat <lora:style:0.8> <lora:detail:1>\n"
        "Negative prompt: blurry\n"
        "Steps: 28, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 832x1216"
    )
    no_negative = GenerationParams(prompt="a cat", negative_prompt="", width=64, height=64, steps=2,
                                   sampler="dpmsolver++", scale=7.5, seed=1)
    assert no_negative.infotext() == "a cat\nSteps: 2, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 1, Size: 64x64"


def test_infotext_appends_sdxl_conditioning_only_when_set():
    params = GenerationParams(prompt="a cat", negative_prompt="", width=64, height=96, steps=2, sampler="euler",
                              scale=7.0, seed=1, prompt2='a "red", fluffy cat', original_height=768)
    # A1111 JSON-quotes values holding commas; the unset original width is the target width.
    assert params.infotext() == ('a cat\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x96, '
                                 'Prompt 2: "a \\"red\\", fluffy cat", Original size: 64x768')
    assert params.size_conditioning() == (768, 64, 0, 0, 96, 64)
    cropped = dataclasses.replace(params, prompt2=None, original_height=None, crop_left=8)
    assert cropped.infotext().endswith("Size: 64x96, Crop top: 0, Crop left: 8")
    assert cropped.size_conditioning() == (96, 64, 0, 8, 96, 64)


def test_saved_png_loads_back_with_its_parameters_and_is_never_overwritten(sampler, tmp_path):
    sample = sampler.render(tiny_prompt())
    folder = str(tmp_path / "sample")
    first = save_sample_image(sample.image, folder, "img.png", sample.params)
    second = save_sample_image(sample.image, folder, "img.png", sample.params)
    assert (os.path.basename(first), os.path.basename(second)) == ("img.png", "img_1.png")
    assert sorted(os.listdir(folder)) == ["img.png", "img_1.png"]  # no temporary files left
    with Image.open(first) as loaded:
        assert loaded.format == "PNG"
        assert loaded.text["parameters"] == (
            "a red cat\nNegative prompt: blurry\nSteps: 3, Sampler: Euler a, CFG scale: 5, Seed: 11, Size: 64x96"
        )
        np.testing.assert_array_equal(np.asarray(loaded.convert("RGB")), np.asarray(sample.image))


def test_sample_image_names_follow_sd_scripts():
    now = time.struct_time((2024, 1, 2, 3, 4, 5, 1, 2, 0))
    assert sample_image_name("mylora", 3, 1200, 1, 42, now) == "mylora_e000003_01_20240102030405_42.png"
    assert sample_image_name("mylora", None, 1200, 0, None, now) == "mylora_001200_00_20240102030405.png"
    assert sample_image_name(None, None, 0, 12, 7, now) == "000000_12_20240102030405_7.png"
