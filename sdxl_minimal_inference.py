"""Render images with an SDXL checkpoint and any number of Kohya LoRAs merged into it.

    python sdxl_minimal_inference.py --ckpt_path sd_xl_base_1.0.safetensors --prompt "a photo of a cat" \\
        --lora_weights "my_lora.safetensors;0.8" "style.safetensors;0.5" --output_dir out
"""

import argparse
import logging
import os
import sys

import mindspore as ms

from library.errors import UserError, exit_on_user_error
from library.model_loading import load_sdxl
from library.sample_prompts import SamplePrompt
from library.sampling import SDXLSampler, save_sample_image
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
    parser.add_argument("--original_width", type=int, default=None)
    parser.add_argument("--original_height", type=int, default=None)
    parser.add_argument("--crop_top", type=int, default=0)
    parser.add_argument("--crop_left", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--max_token_length", type=int, default=None, choices=[None, 150, 225])
    parser.add_argument("--interactive", action="store_true", help="read prompts from the terminal until empty")
    return parser


def refuse_unsupported(args) -> None:
    """Conditioning this renderer does not apply yet is refused rather than silently ignored."""
    if args.prompt2 is not None and args.prompt2 != args.prompt:
        raise UserError("--prompt2 different from --prompt is not supported yet; remove it")
    if (args.original_width or args.target_width) != args.target_width or \
            (args.original_height or args.target_height) != args.target_height or args.crop_top or args.crop_left:
        raise UserError("--original_width/--original_height/--crop_top/--crop_left other than the target size "
                        "and 0 are not supported yet; remove them")


def parse_lora_weights(values):
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


def merge_loras(models, loras) -> None:
    for path, multiplier in loras:
        network, weights = lora.create_network_from_weights(multiplier, path, models.vae, models.text_encoders,
                                                            models.unet, for_inference=True)
        network.merge_to(models.text_encoders, models.unet, weights)
        logging.info("merged %s with multiplier %s", path, multiplier)


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = setup_parser().parse_args(argv)
    with exit_on_user_error():
        refuse_unsupported(args)
        loras = parse_lora_weights(args.lora_weights)
        models = load_sdxl(args.ckpt_path, args.vae)
        merge_loras(models, loras)
        sampler = SDXLSampler(models, load_sdxl_tokenizers(args.tokenizer_cache_dir), args.max_token_length,
                              default_sampler=args.sampler)
        os.makedirs(args.output_dir, exist_ok=True)
        prompts = iter(lambda: input("prompt (empty to quit): ").strip(), "") if args.interactive else [args.prompt]
        for index, text in enumerate(prompts):
            prompt = SamplePrompt(prompt=text, negative_prompt=args.negative_prompt, width=args.target_width,
                                  height=args.target_height, seed=args.seed, sample_steps=args.steps,
                                  scale=args.guidance_scale)
            sample = sampler.render(prompt, [(os.path.basename(p), m) for p, m in loras])
            path = save_sample_image(sample.image, args.output_dir, f"image_{index:03d}.png", sample.params)
            print(f"saved {path} (seed {sample.params.seed})")


if __name__ == "__main__":
    ms.set_context(mode=ms.PYNATIVE_MODE)
    main(sys.argv[1:])
