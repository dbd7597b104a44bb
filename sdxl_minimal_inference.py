"""Render images with an SDXL checkpoint and any number of Kohya LoRAs merged into it.

    python sdxl_minimal_inference.py --ckpt_path sd_xl_base_1.0.safetensors --prompt "a photo of a cat" \\
        --lora_weights "my_lora.safetensors;0.8" "style.safetensors;0.5" --output_dir out

As sd-scripts' script: text encoder 1 reads --prompt, text encoder 2 reads --prompt2 (default: --prompt)
and the negative prompt goes to both; y embeds the original size, crop and target size (defaults: the
target size and 0, 0) for both guidance halves; images are saved as image_<YYYYmmdd-HHMMSS>_000.png.
Unlike it, a name already taken gets `_1`, `_2`, ... instead of being overwritten, and each PNG
carries its generation parameters.
"""

import argparse
import dataclasses
import logging
import os
import sys
from datetime import datetime
from typing import List, Optional, Tuple

import mindspore as ms

from library.errors import UserError, exit_on_user_error
from library.model_loading import load_sdxl
from library.sample_prompts import SamplePrompt
from library.sampling import GenerationParams, SDXLSampler, resolve_params, save_sample_image
from library.tokenizers import load_sdxl_tokenizers
from networks import lora


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt_path", type=str, required=True, help="SDXL single file or diffusers folder")
    parser.add_argument("--vae", type=str, default=None)
    parser.add_argument("--tokenizer_cache_dir", type=str, default=None)
    parser.add_argument("--prompt", type=str, default="A photo of a cat")
    parser.add_argument("--prompt2", type=str, default=None, help="prompt for text encoder 2 (default: --prompt)")
    parser.add_argument("--negative_prompt", type=str, default="")
    parser.add_argument("--output_dir", type=str, default=".")
    parser.add_argument("--lora_weights", type=str, nargs="*", default=[],
                        help="Kohya LoRA files, each `path;multiplier` (multiplier defaults to 1.0)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance_scale", type=float, default=7.0)
    parser.add_argument("--sampler", type=str, default="euler", help="sampler name, as --sample_sampler")
    parser.add_argument("--target_width", type=int, default=1024)
    parser.add_argument("--target_height", type=int, default=1024)
    parser.add_argument("--original_width", type=int, default=None, help="size conditioning (default: target)")
    parser.add_argument("--original_height", type=int, default=None, help="size conditioning (default: target)")
    parser.add_argument("--crop_top", type=int, default=0, help="crop conditioning, in pixels")
    parser.add_argument("--crop_left", type=int, default=0, help="crop conditioning, in pixels")
    parser.add_argument("--seed", type=int, default=None, help="default: a random seed per image (recorded)")
    parser.add_argument("--max_token_length", type=int, default=None, choices=[None, 150, 225])
    parser.add_argument("--interactive", action="store_true",
                        help="ask for prompt, prompt2, negative prompt and seed until the prompt is empty")
    return parser


def parse_lora_weights(values: List[str]) -> List[Tuple[str, float]]:
    loras = []
    for value in values:
        path, _, multiplier = value.partition(";")
        try:
            loras.append((path, float(multiplier) if multiplier else 1.0))
        except ValueError:
            raise UserError(f"--lora_weights {value!r}: expected `path;multiplier` with a number") from None
        if not os.path.exists(path):
            raise UserError(f"--lora_weights {path}: file not found")
    return loras


def merge_loras(models, loras: List[Tuple[str, float]]) -> None:
    for path, multiplier in loras:
        network, weights = lora.create_network_from_weights(multiplier, path, models.vae, models.text_encoders,
                                                            models.unet, for_inference=True)
        network.merge_to(models.text_encoders, models.unet, weights)
        logging.info("merged %s with multiplier %s", path, multiplier)


def generation_params(args, prompt: str, prompt2: Optional[str], negative_prompt: str, seed: Optional[int],
                      loras: List[Tuple[str, float]]) -> GenerationParams:
    """One image's parameters, every conditioning value resolved so the PNG records all of them."""
    request = SamplePrompt(prompt=prompt, negative_prompt=negative_prompt, width=args.target_width,
                           height=args.target_height, seed=seed, sample_steps=args.steps, scale=args.guidance_scale)
    params = resolve_params(request, args.sampler, [(os.path.basename(path), m) for path, m in loras])
    return dataclasses.replace(
        params,
        prompt2=prompt if prompt2 is None else prompt2,
        original_width=params.width if args.original_width is None else args.original_width,
        original_height=params.height if args.original_height is None else args.original_height,
        crop_top=args.crop_top,
        crop_left=args.crop_left,
    )


def ask_for_images(args):
    """(prompt, prompt2, negative prompt, seed) per image, asked as sd-scripts asks; an empty answer means
    the command-line value (for prompt2: the prompt), an empty prompt ends."""
    while True:
        prompt = input("prompt: ")
        if prompt == "":
            return
        prompt2 = input("prompt2: ") or None
        negative_prompt = input("negative prompt: ") or args.negative_prompt
        seed = input("seed: ").strip()
        if seed and not seed.isdigit():
            raise UserError(f"seed {seed!r}: expected a whole number, or nothing for --seed")
        yield prompt, prompt2, negative_prompt, int(seed) if seed else args.seed


def image_file_name(now: datetime) -> str:
    """sd-scripts' name: the time to the second, then the image's index in its batch (always one image)."""
    return f"image_{now.strftime('%Y%m%d-%H%M%S')}_000.png"


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = setup_parser().parse_args(argv)
    with exit_on_user_error():
        loras = parse_lora_weights(args.lora_weights)
        models = load_sdxl(args.ckpt_path, args.vae)
        merge_loras(models, loras)
        sampler = SDXLSampler(models, load_sdxl_tokenizers(args.tokenizer_cache_dir), args.max_token_length,
                              default_sampler=args.sampler)
        os.makedirs(args.output_dir, exist_ok=True)
        requests = ask_for_images(args) if args.interactive else \
            [(args.prompt, args.prompt2, args.negative_prompt, args.seed)]
        for prompt, prompt2, negative_prompt, seed in requests:
            params = generation_params(args, prompt, prompt2, negative_prompt, seed, loras)
            image = sampler.decode(sampler.generate_latents(params))
            path = save_sample_image(image, args.output_dir, image_file_name(datetime.now()), params)
            print(f"saved {path} (seed {params.seed})")


if __name__ == "__main__":
    ms.set_context(mode=ms.PYNATIVE_MODE)
    main(sys.argv[1:])
