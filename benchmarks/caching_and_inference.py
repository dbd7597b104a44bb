"""Checkpoint load time, latent and text-encoder caching throughput, and inference seconds per image, through
the trainer's and the inference script's own code.

    python benchmarks/caching_and_inference.py                       # the tiny SDXL, made here
    python benchmarks/caching_and_inference.py --checkpoint sdxl.safetensors --resolution 512

Caching runs twice over the demo set's 8 images and captions (tools/make_demo_dataset.py), in memory as
without --cache_latents_to_disk: the first pass includes compiling the encoders, the second is the steady
throughput. Inference renders `--generate` images of `--steps` Euler steps at the caching resolution, with
classifier-free guidance as sdxl_minimal_inference.py does; the first image includes compilation, the median
of the rest is reported.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mindspore as ms  # noqa: E402

import sdxl_minimal_inference  # noqa: E402
from library.distributed import init_data_parallel  # noqa: E402
from library.errors import exit_on_user_error  # noqa: E402
from library.sampling import SDXLSampler  # noqa: E402
from library.tokenizers import load_sdxl_tokenizers  # noqa: E402
from library.train_args import parse_args  # noqa: E402
from library.train_dataset import build_dataset_group  # noqa: E402
from sdxl_train_network import SdxlNetworkTrainer  # noqa: E402
from tools.make_demo_dataset import SCENES  # noqa: E402
from tools.make_demo_dataset import main as make_demo_dataset  # noqa: E402
from tools.make_tiny_sdxl import main as make_tiny_sdxl  # noqa: E402


def timed(function):
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def benchmark_caching(checkpoint: str, resolution: int, work_dir: str):
    """-> (trainer's model load s, [latent pass s], [text-encoder pass s], models)."""
    image_dir = os.path.join(work_dir, "images")
    make_demo_dataset(["--out", image_dir, "--size", str(resolution)])
    dataset = os.path.join(work_dir, "dataset.toml")
    with open(dataset, "w") as file:
        file.write(f'[general]\ncaption_extension = ".txt"\nenable_bucket = false\n[[datasets]]\n'
                   f'resolution = {resolution}\nbatch_size = 1\n[[datasets.subsets]]\nimage_dir = "{image_dir}"\n')
    args = parse_args(["--pretrained_model_name_or_path", checkpoint, "--dataset_config", dataset,
                       "--output_dir", os.path.join(work_dir, "out"), "--cache_latents",
                       "--cache_text_encoder_outputs", "--network_train_unet_only"])
    trainer = SdxlNetworkTrainer()
    trainer.world = init_data_parallel()
    group = build_dataset_group(args, sdxl=True)
    load_seconds, models = timed(lambda: trainer.load_target_model(args))
    latent_passes = [timed(lambda: trainer.cache_latents_if_needed(args, models, group))[0] for _ in range(2)]
    text_passes = [timed(lambda: trainer.cache_text_encoder_outputs_if_needed(args, models, group))[0]
                   for _ in range(2)]
    return load_seconds, latent_passes, text_passes, models


def benchmark_inference(checkpoint: str, models, resolution: int, steps: int, generate: int):
    """-> [s per image], rendered as sdxl_minimal_inference.py renders them."""
    args = sdxl_minimal_inference.setup_parser().parse_args(
        ["--ckpt_path", checkpoint, "--steps", str(steps), "--target_width", str(resolution),
         "--target_height", str(resolution), "--prompt", "a red circle", "--negative_prompt", "blurry"])
    sampler = SDXLSampler(models, load_sdxl_tokenizers(args.tokenizer_cache_dir), args.max_token_length,
                          default_sampler=args.sampler)
    seconds = []
    for seed in range(generate):
        params = sdxl_minimal_inference.generation_params(args, args.prompt, args.prompt2, args.negative_prompt,
                                                          seed, [])
        seconds.append(timed(lambda: sampler.decode(sampler.generate_latents(params)))[0])
    return seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="an SDXL single file or diffusers folder (default: the "
                                                          "tiny SDXL, written to a temporary folder)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10, help="sampling steps per generated image")
    parser.add_argument("--generate", type=int, default=3, help="images to generate (the first compiles)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as work_dir:
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint = os.path.join(work_dir, "tiny_sdxl.safetensors")
            make_tiny_sdxl(["--out", checkpoint])
        load_seconds, latent_passes, text_passes, models = benchmark_caching(
            checkpoint, args.resolution, work_dir)
        ms.set_context(mode=ms.PYNATIVE_MODE)  # as sdxl_minimal_inference.py runs
        inference = benchmark_inference(checkpoint, models, args.resolution, args.steps, args.generate)

    print(f"checkpoint={checkpoint if args.checkpoint else 'tiny'} resolution={args.resolution}")
    print(f"  load (trainer's loader, UNet + both text encoders + VAE): {load_seconds:.1f} s")
    for name, passes in (("latents (VAE encoder)", latent_passes), ("text-encoder outputs", text_passes)):
        print(f"  caching {name}: {len(SCENES) / passes[1]:.2f} images/s steady "
              f"({passes[1]:.1f} s for {len(SCENES)}; first pass {passes[0]:.1f} s, with compilation)")
    steady = statistics.median(inference[1:]) if len(inference) > 1 else inference[0]
    print(f"  inference, {args.steps} Euler steps with guidance + VAE decode: {steady:.2f} s/image "
          f"(first image {inference[0]:.1f} s, with compilation)")


if __name__ == "__main__":
    with exit_on_user_error():
        main()
