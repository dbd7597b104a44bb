"""Full-size SDXL: build it from configs/sdxl_base with random weights, write a fp16 single file, and
measure loading it (time, peak RSS) in a fresh process.

    python benchmarks/full_size_load.py --write /tmp/sdxl_random_fp16.safetensors
    python benchmarks/full_size_load.py --load /tmp/sdxl_random_fp16.safetensors
"""

import argparse
import os
import resource
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.layers import weight_init  # noqa: E402
from library.model_configs import sdxl_base_configs  # noqa: E402
from library.model_loading import SDXLModels, load_sdxl, save_single_file  # noqa: E402
from library.sdxl_unet import SDXLUNet  # noqa: E402
from library.sdxl_vae import AutoencoderKL  # noqa: E402
from library.text_encoders import build_text_encoder  # noqa: E402


def parameter_count(cell) -> int:
    return sum(int(np.prod(p.shape)) for _, p in cell.parameters_and_names())


def report(models: SDXLModels) -> None:
    for label, cell in (("UNet", models.unet), ("text encoder 1", models.text_encoder1),
                        ("text encoder 2", models.text_encoder2), ("VAE", models.vae)):
        print(f"{label}: {parameter_count(cell) / 1e6:.1f} M parameters")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", metavar="PATH")
    group.add_argument("--load", metavar="PATH")
    args = parser.parse_args(argv)
    if args.write:
        unet_config, vae_config, te1_config, te2_config = sdxl_base_configs()
        start = time.perf_counter()
        with weight_init(seed=0):
            models = SDXLModels(SDXLUNet(unet_config), AutoencoderKL(vae_config),
                                build_text_encoder(te1_config, False), build_text_encoder(te2_config, True),
                                np.array(4.6052, np.float32))
        print(f"built full-size SDXL with random weights in {time.perf_counter() - start:.1f} s")
        report(models)
        start = time.perf_counter()
        save_single_file(models, args.write, np.float16)
        print(f"wrote {args.write} ({os.path.getsize(args.write) / 2**30:.2f} GiB) in {time.perf_counter() - start:.1f} s, "
              f"peak RSS {peak_rss_gib():.2f} GiB")
    else:
        start = time.perf_counter()
        models = load_sdxl(args.load)
        print(f"loaded {args.load} in {time.perf_counter() - start:.1f} s, peak RSS {peak_rss_gib():.2f} GiB")
        report(models)


if __name__ == "__main__":
    main()
