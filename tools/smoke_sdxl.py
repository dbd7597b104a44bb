"""Load an SDXL checkpoint and run each model once, compiled: a quick check that a file works here.

    python tools/smoke_sdxl.py --ckpt_path model.safetensors [--vae vae.safetensors] [--resolution 256]
"""

import argparse
import os
import resource
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mindspore as ms  # noqa: E402

from library.errors import exit_on_user_error  # noqa: E402
from library.model_loading import load_sdxl  # noqa: E402
from library.sdxl_unet import SizeEmbedding  # noqa: E402
from library.text_encoders import SDXLTextEncoding, eos_mask  # noqa: E402
from library.tokenizers import load_sdxl_tokenizers, tokenize_prompts  # noqa: E402


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt_path", required=True)
    parser.add_argument("--vae", default=None)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--prompt", default="a photo of a cat")
    args = parser.parse_args(argv)
    with exit_on_user_error():
        start = time.perf_counter()
        models = load_sdxl(args.ckpt_path, args.vae)
        print(f"loaded {args.ckpt_path} in {time.perf_counter() - start:.1f} s")

        tokenizer1, tokenizer2 = load_sdxl_tokenizers()
        ids1 = tokenize_prompts(tokenizer1, [args.prompt], None)[:, 0]
        ids2 = tokenize_prompts(tokenizer2, [args.prompt], None)[:, 0]
        encode = ms.jit(SDXLTextEncoding(models.text_encoder1, models.text_encoder2).construct)
        context, pooled = encode(ms.Tensor(ids1), ms.Tensor(ids2), ms.Tensor(eos_mask(ids2)))

        size = args.resolution
        sizes = ms.Tensor(np.array([[size, size, 0, 0, size, size]], np.float32))
        y = SizeEmbedding()(pooled, sizes)
        latents = ms.Tensor(np.random.default_rng(0).standard_normal((1, 4, size // 8, size // 8)).astype(np.float32))
        unet = ms.jit(models.unet.construct)
        for label in ("UNet forward (compile + run)", "UNet forward"):
            start = time.perf_counter()
            noise_pred = unet(latents, ms.Tensor(np.array([999], np.int32)), context, y)
            noise_pred.asnumpy()
            print(f"{label}: {time.perf_counter() - start:.2f} s")
        image = ms.jit(models.vae.decode)(noise_pred)
        print(f"context {tuple(context.shape)}, pooled {tuple(pooled.shape)}, image {tuple(image.shape)}, "
              f"peak RSS {peak_rss_gib():.2f} GiB")


if __name__ == "__main__":
    main()
