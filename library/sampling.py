"""Render sample images with an SDXL model, as sd-scripts does for training samples.

`SDXLSampler.render(prompt)` follows sd-scripts' SDXL sample pipeline: prompts tokenized with their
attention weights and --max_token_length chunks, classifier-free guidance against the negative
prompt when the scale is above 1 (the unconditional half first), size conditioning of
(original height, original width, crop top, crop left, height, width) -- by default
(height, width, 0, 0, height, width) -- for both halves, initial noise times the sampler's init sigma,
the VAE decoding latents / 0.13025, and pixels as round(255 * clip(image / 2 + 0.5, 0, 1)).
A second prompt, as sdxl_minimal_inference.py's --prompt2, goes to text encoder 2 only.

Noise comes from numpy's generator seeded with the prompt's seed, so a seed gives the same image on
every device (not the same as torch's generator: sd-scripts' images are not reproduced bit for bit).
The UNet, text encoders and VAE decoder are each compiled once and reused; a new latent size or a
switch between guided and unguided prompts compiles the UNet once more.
"""

import json
import logging
import os
import secrets
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import mindspore as ms

from library.errors import UserError
from library.model_loading import SDXLModels
from library.sample_prompts import SamplePrompt, parse_prompt_attention
from library.samplers import check_sampler_name, make_sampler, run_sampler
from library.sdxl_unet import SizeEmbedding
from library.sdxl_vae import SDXL_VAE_SCALE_FACTOR
from library.text_encoders import SDXLTextEncoding, eos_mask
from library.tokenizers import TOKENS_PER_CHUNK, chunk_count, chunk_ids

logger = logging.getLogger(__name__)

# How A1111-style "parameters" text names each sampler, so tools that read it recognise the sampler.
A1111_SAMPLER_NAMES = {
    "ddim": "DDIM",
    "dpmsolver++": "DPM++ 2M",
    "euler": "Euler",
    "k_euler": "Euler",
    "euler_a": "Euler a",
    "k_euler_a": "Euler a",
    "lms": "LMS",
    "k_lms": "LMS",
    "heun": "Heun",
    "dpm_2": "DPM2",
    "k_dpm_2": "DPM2",
    "dpm_2_a": "DPM2 a",
    "k_dpm_2_a": "DPM2 a",
}

MIN_IMAGE_SIZE = 64


@dataclass(frozen=True)
class GenerationParams:
    """Everything that determines one sample image, with defaults and the random seed resolved."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    sampler: str
    scale: float
    seed: int
    loras: Tuple[Tuple[str, float], ...] = ()  # (name, multiplier) of LoRAs applied to the model
    # SDXL-only conditioning; None means what sd-scripts' training samples use (prompt, target size).
    prompt2: Optional[str] = None  # text encoder 2's prompt (the negative prompt goes to both)
    original_width: Optional[int] = None
    original_height: Optional[int] = None
    crop_top: Optional[int] = None
    crop_left: Optional[int] = None

    def size_conditioning(self) -> Tuple[int, int, int, int, int, int]:
        """The six numbers SDXL embeds into y, in SGM's order: original (h, w), crop (top, left), target (h, w)."""
        return (
            self.height if self.original_height is None else self.original_height,
            self.width if self.original_width is None else self.original_width,
            self.crop_top or 0,
            self.crop_left or 0,
            self.height,
            self.width,
        )

    def infotext(self) -> str:
        """A1111's "parameters" text; LoRAs appear as its <lora:name:multiplier> prompt tags.

        Fields A1111 has no name for (prompt 2, original size, crop) are appended to the settings line
        when set, the prompt JSON-quoted as A1111 quotes values, so its infotext parser still reads them.
        """
        prompt = " ".join([self.prompt, *(f"<lora:{name}:{multiplier:g}>" for name, multiplier in self.loras)])
        lines = [prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        settings = [f"Steps: {self.steps}", f"Sampler: {A1111_SAMPLER_NAMES[self.sampler]}",
                    f"CFG scale: {self.scale:g}", f"Seed: {self.seed}", f"Size: {self.width}x{self.height}"]
        if self.prompt2 is not None:
            settings.append(f"Prompt 2: {json.dumps(self.prompt2, ensure_ascii=False)}")
        if self.original_width is not None or self.original_height is not None:
            original_height, original_width = self.size_conditioning()[:2]
            settings.append(f"Original size: {original_width}x{original_height}")
        if self.crop_top is not None or self.crop_left is not None:
            settings += [f"Crop top: {self.crop_top or 0}", f"Crop left: {self.crop_left or 0}"]
        lines.append(", ".join(settings))
        return "\n".join(lines)


@dataclass(frozen=True)
class SampleImage:
    image: Image.Image
    params: GenerationParams


def resolve_params(
    prompt: SamplePrompt, default_sampler: str, loras: Sequence[Tuple[str, float]] = ()
) -> GenerationParams:
    """sd-scripts' reading of a prompt: sizes rounded down to a multiple of 8 (at least 64), an empty
    negative prompt when none is given, --sample_sampler unless the prompt names one, and a fresh
    random seed when it has none (recorded, so the image can be made again)."""
    return GenerationParams(
        prompt=prompt.prompt,
        negative_prompt=prompt.negative_prompt or "",
        width=max(MIN_IMAGE_SIZE, prompt.width - prompt.width % 8),
        height=max(MIN_IMAGE_SIZE, prompt.height - prompt.height % 8),
        steps=prompt.sample_steps,
        sampler=check_sampler_name(prompt.sample_sampler or default_sampler),
        scale=prompt.scale,
        seed=prompt.seed if prompt.seed is not None else secrets.randbelow(2**32),
        loras=tuple((name, float(multiplier)) for name, multiplier in loras),
    )


def tokenize_weighted(tokenizer, text: str, max_token_length: Optional[int]) -> Tuple[np.ndarray, np.ndarray]:
    """(ids int32 [n_chunks, 77], weights float32 [n_chunks * 75 + 2]) for a prompt with attention syntax.

    As sd-scripts: each weighted run is tokenized on its own, the runs' tokens are joined and cut to
    n_chunks * 75, framed by <BOS> ... <EOS> and padded, then cut into 77-token chunks. `weights` has
    one entry per position of the joined encoder states (1.0 at <BOS>, <EOS> and padding).
    """
    n_chunks = chunk_count(max_token_length)
    capacity = n_chunks * TOKENS_PER_CHUNK
    ids, weights = [], []
    for run_text, weight in parse_prompt_attention(text):
        run_ids = tokenizer(run_text, add_special_tokens=False, verbose=False).input_ids
        ids += run_ids
        weights += [weight] * len(run_ids)
    if len(ids) > capacity:
        logger.warning(f"prompt truncated to {capacity} tokens (see --max_token_length): {text!r}")
        ids, weights = ids[:capacity], weights[:capacity]
    padding = capacity - len(ids)
    row = np.array([tokenizer.bos_token_id, *ids, tokenizer.eos_token_id, *[tokenizer.pad_token_id] * padding])
    chunks = np.stack([chunk_ids(row, index, tokenizer) for index in range(n_chunks)]).astype(np.int32)
    return chunks, np.array([1.0, *weights, *[1.0] * (padding + 1)], dtype=np.float32)


class SDXLSampler:
    """Renders SamplePrompts with one SDXL model; keep one instance to reuse its compiled graphs."""

    def __init__(
        self,
        models: SDXLModels,
        tokenizers,
        max_token_length: Optional[int] = None,
        v_parameterization: bool = False,
        default_sampler: str = "ddim",
        unet_forward: Optional[Callable] = None,
    ):
        self.models = models
        self.tokenizer1, self.tokenizer2 = tokenizers
        self.max_token_length = max_token_length
        self.prediction_type = "v_prediction" if v_parameterization else "epsilon"
        self.default_sampler = check_sampler_name(default_sampler)
        text_encoding = SDXLTextEncoding(models.text_encoder1, models.text_encoder2, chunk_count(max_token_length))
        self._encode_text = ms.jit(text_encoding.construct)
        # (latents, timesteps, context, y) -> UNet output; the trainer under --gradient_checkpointing passes its units'
        self._unet = unet_forward or ms.jit(models.unet.construct)
        self._decode = ms.jit(models.vae.decode)
        self._size_embedding = SizeEmbedding()

    def render(self, prompt: SamplePrompt, loras: Sequence[Tuple[str, float]] = ()) -> SampleImage:
        params = resolve_params(prompt, self.default_sampler, loras)
        return SampleImage(self.decode(self.generate_latents(params)), params)

    def encode_prompts(
        self, texts: Sequence[str], texts2: Optional[Sequence[str]] = None
    ) -> Tuple[np.ndarray, np.ndarray]:
        """(context [B, n_chunks*75+2, D1+D2] with attention weights applied, pooled [B, P]).

        Text encoder 1 reads `texts`, text encoder 2 reads `texts2` (default: the same texts), so the
        pooled vector comes from `texts2`.
        """
        texts2 = texts if texts2 is None else texts2
        tokens1 = [tokenize_weighted(self.tokenizer1, text, self.max_token_length) for text in texts]
        tokens2 = [tokenize_weighted(self.tokenizer2, text, self.max_token_length) for text in texts2]
        ids1 = np.concatenate([ids for ids, _ in tokens1])
        ids2 = np.concatenate([ids for ids, _ in tokens2])
        context, pooled = self._encode_text(ms.Tensor(ids1), ms.Tensor(ids2), ms.Tensor(eos_mask(ids2)))
        context = context.asnumpy().astype(np.float32)
        # The weights scale each encoder's hidden states; the pooled vector stays unweighted, as in sd-scripts.
        width1 = self.models.text_encoder1.config.hidden_size
        context[..., :width1] *= np.stack([weights for _, weights in tokens1])[..., None]
        context[..., width1:] *= np.stack([weights for _, weights in tokens2])[..., None]
        return context, pooled.asnumpy().astype(np.float32)

    def generate_latents(self, params: GenerationParams) -> np.ndarray:
        """Denoised latents [1, 4, height/8, width/8], scaled as the UNet sees them."""
        vae_factor = 2 ** (len(self.models.vae.config.ch_mult) - 1)
        # The UNet halves the latents at each level and concatenates the skips on the way up, so an odd
        # size would fail deep inside it (as in sd-scripts); name the prompt instead.
        multiple = vae_factor * 2 ** (len(self.models.unet.config.channel_mult) - 1)
        if params.width % multiple or params.height % multiple:
            raise UserError(f"sample prompt {params.prompt!r}: size {params.width}x{params.height} is not supported; "
                            f"SDXL needs width and height in multiples of {multiple}")
        guided = params.scale > 1.0
        context, vector = self.conditioning(params)
        batch_size = len(context)
        context, vector = ms.Tensor(context), ms.Tensor(vector)

        def model(model_input: np.ndarray, timestep: float) -> np.ndarray:
            batch = np.repeat(model_input.astype(np.float32), batch_size, axis=0)
            timesteps = np.full((batch_size,), timestep, np.float32)
            output = self._unet(ms.Tensor(batch), ms.Tensor(timesteps), context, vector).asnumpy().astype(np.float32)
            if not guided:
                return output
            unconditional, conditional = output[:1], output[1:]
            return unconditional + params.scale * (conditional - unconditional)

        rng = np.random.default_rng(params.seed)
        shape = (1, self.models.unet.config.in_channels, params.height // vae_factor, params.width // vae_factor)
        noise = rng.standard_normal(shape).astype(np.float32)
        sampler = make_sampler(params.sampler, params.steps, self.prediction_type)
        return run_sampler(sampler, model, noise, rng).astype(np.float32)

    def conditioning(self, params: GenerationParams) -> Tuple[np.ndarray, np.ndarray]:
        """The UNet's (context, y): rows (negative prompt, prompt) when guided, only the prompt's otherwise.

        y = [TE2's pooled vector, size embeddings of `params.size_conditioning()`], the same sizes for both rows.
        """
        prompt2 = params.prompt if params.prompt2 is None else params.prompt2
        # Both prompts are encoded even without guidance, so the text encoders compile for one batch size.
        context, pooled = self.encode_prompts([params.negative_prompt, params.prompt],
                                              [params.negative_prompt, prompt2])
        if params.scale <= 1.0:
            context, pooled = context[1:], pooled[1:]
        sizes = np.tile(np.array([params.size_conditioning()], np.float32), (len(pooled), 1))
        vector = self._size_embedding(ms.Tensor(pooled), ms.Tensor(sizes)).asnumpy().astype(np.float32)
        return context, vector

    def decode(self, latents: np.ndarray) -> Image.Image:
        image = self._decode(ms.Tensor((latents / SDXL_VAE_SCALE_FACTOR).astype(np.float32))).asnumpy()[0]
        pixels = np.clip(image.astype(np.float32) / 2 + 0.5, 0.0, 1.0).transpose(1, 2, 0)
        return Image.fromarray((pixels * 255).round().astype(np.uint8))


# ---- Files --------------------------------------------------------------------------------------------


def sample_image_name(
    output_name: Optional[str], epoch: Optional[int], steps: int, index: int, seed: Optional[int],
    now: Optional[time.struct_time] = None,
) -> str:
    """sd-scripts' training sample name: `[output_name_]{e<epoch:06>|<steps:06>}_{index:02}_{localtime}[_seed].png`.

    `epoch` is given for samples at an epoch's end, None for step samples; `seed` is the prompt's
    own seed (None when it had none, so the name has no seed).
    """
    prefix = "" if output_name is None else f"{output_name}_"
    progress = f"e{epoch:06d}" if epoch is not None else f"{steps:06d}"
    timestamp = time.strftime("%Y%m%d%H%M%S", now or time.localtime())
    seed_suffix = "" if seed is None else f"_{seed}"
    return f"{prefix}{progress}_{index:02d}_{timestamp}{seed_suffix}.png"


def save_sample_image(image: Image.Image, output_dir: str, name: str, params: GenerationParams) -> str:
    """Write `image` as PNG with `params.infotext()` in its "parameters" text chunk; return the path.

    An existing file is never replaced: a taken name gets `_1`, `_2`, ... before the extension. The
    PNG is written to a temporary file and renamed, so a reader never sees half an image.
    """
    os.makedirs(output_dir, exist_ok=True)
    path = _free_path(os.path.join(output_dir, name))
    info = PngInfo()
    info.add_text("parameters", params.infotext())
    temp_path = os.path.join(output_dir, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    try:
        with open(temp_path, "xb") as handle:
            image.save(handle, format="PNG", pnginfo=info)
        os.replace(temp_path, path)
    except BaseException:
        if os.path.exists(temp_path):
            os.remove(temp_path)
        raise
    return path


def _free_path(path: str) -> str:
    stem, extension = os.path.splitext(path)
    candidate, number = path, 0
    while os.path.exists(candidate):
        number += 1
        candidate = f"{stem}_{number}{extension}"
    return candidate
