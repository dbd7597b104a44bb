"""Write a tiny, seeded SDXL-shaped checkpoint for tests and the demo.

It has SDXL's topology (3 UNet levels with 2 resnets each, transformer blocks in levels 2 and 3 and
the middle block, text_time conditioning, both CLIP text encoders with TE2's projection, a 4-level
VAE) at tiny widths, so every tensor name has SDXL's structure and any SDXL converter applies.

    python tools/make_tiny_sdxl.py --seed 0 --out tiny.safetensors            # single file
    python tools/make_tiny_sdxl.py --seed 0 --out tiny_sdxl --format diffusers
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mindspore as ms  # noqa: E402

from library.errors import exit_on_user_error  # noqa: E402
from library.layers import weight_init  # noqa: E402
from library.model_loading import SDXLModels, save_diffusers_folder, save_single_file  # noqa: E402
from library.sdxl_unet import SDXLUNet, UNetConfig  # noqa: E402
from library.sdxl_vae import AutoencoderKL, VAEConfig  # noqa: E402
from library.text_encoders import build_text_encoder, clip_text_config  # noqa: E402

TE1_HIDDEN, TE2_HIDDEN = 64, 128
TINY_UNET = UNetConfig(
    model_channels=32,
    channel_mult=(1, 2, 4),
    num_res_blocks=2,
    transformer_depth=(0, 1, 1),
    transformer_depth_middle=1,
    num_head_channels=64,
    context_dim=TE1_HIDDEN + TE2_HIDDEN,
    adm_in_channels=TE2_HIDDEN + 6 * 256,
)
TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1)
TINY_TE1 = dict(hidden_size=TE1_HIDDEN, num_layers=2, intermediate_size=128, vocab_size=49408, max_positions=77,
                projection_dim=TE1_HIDDEN, hidden_act="quick_gelu")
TINY_TE2 = dict(hidden_size=TE2_HIDDEN, num_layers=2, intermediate_size=256, vocab_size=49408, max_positions=77,
                projection_dim=TE2_HIDDEN, hidden_act="gelu")


def _randomize(cell, rng: np.random.Generator) -> None:
    """Seeded values for every parameter, independent of framework initialisers: norms near 1, small
    biases, weights scaled by 1/sqrt(fan_in) so activations stay in range."""
    for name, param in cell.parameters_and_names():
        shape = tuple(param.shape)
        leaf = name.rsplit(".", 1)[-1]
        is_norm = "norm" in name or leaf in ("gamma", "beta")
        if leaf in ("bias", "beta"):
            value = 0.02 * rng.standard_normal(shape)
        elif is_norm:
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        elif "embedding" in name:
            value = 0.5 * rng.standard_normal(shape)
        else:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            value = rng.standard_normal(shape) / np.sqrt(fan_in)
        param.set_data(ms.Tensor(value.astype(np.float32)))


def make_tiny_sdxl(seed: int = 0) -> SDXLModels:
    rng = np.random.default_rng(seed)
    with weight_init(seed=seed, skip=True):
        unet = SDXLUNet(TINY_UNET)
        vae = AutoencoderKL(TINY_VAE)
    text_encoder1 = build_text_encoder(clip_text_config(**TINY_TE1), with_projection=False)
    text_encoder2 = build_text_encoder(clip_text_config(**TINY_TE2), with_projection=True)
    for cell in (unet, vae, text_encoder1, text_encoder2):
        _randomize(cell, rng)
    logit_scale = np.array(np.log(1 / 0.07), dtype=np.float32)
    return SDXLModels(unet, vae, text_encoder1, text_encoder2, logit_scale)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="output .safetensors file, or folder with --format diffusers")
    parser.add_argument("--format", choices=("single", "diffusers"), default="single")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    args = parser.parse_args(argv)
    with exit_on_user_error():
        models = make_tiny_sdxl(args.seed)
        dtype = np.float16 if args.dtype == "float16" else None
        if args.format == "single":
            save_single_file(models, args.out, dtype)
        else:
            save_diffusers_folder(models, args.out, dtype)
        print(f"wrote tiny SDXL ({args.format}, seed {args.seed}) to {args.out}")


if __name__ == "__main__":
    main()
