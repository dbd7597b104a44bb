"""Random test images written in a real image format."""

import os

import numpy as np
from PIL import Image


def make_image(path, width, height, seed=0, mode="RGB"):
    channels = 4 if mode == "RGBA" else 3
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels, mode).save(path)
    return str(path)
