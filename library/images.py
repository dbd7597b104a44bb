"""Image files: finding, checking, loading, resizing and cropping them as sd-scripts does.

- `list_image_files(directory)`: the images of a folder (PNG, JPEG, WebP, BMP; any case).
- `probe_image(path) -> (width, height)`: decodes the whole file so corrupt or truncated images are
  found before training; the size is after EXIF orientation.
- `load_image(path, keep_alpha)`: uint8 RGB (transparent pixels composited on white) or RGBA.
- `fit_to_bucket(image, bucket_reso, resized_size, ...)`: resize then crop (centre or random) to the
  bucket, returning the original size and crop box used for SDXL's conditioning.
- `color_augment`, `to_model_input`, `sdxl_size_condition`: the remaining per-image steps.

Sizes are (width, height); arrays are HWC as loaded. Resizing uses cv2 (INTER_AREA to shrink) or
Pillow (Lanczos to enlarge, and `box`), exactly as sd-scripts' resize_image chooses.
"""

import os
import random
from typing import List, Optional, Tuple

import cv2
import numpy as np
from PIL import Image, ImageOps

from library.buckets import crop_ltrb

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
RESIZE_INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")

_CV2_INTERPOLATION = {
    "nearest": cv2.INTER_NEAREST_EXACT,
    "bilinear": cv2.INTER_LINEAR,
    "linear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "cubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
}
_PIL_INTERPOLATION = {"lanczos": Image.Resampling.LANCZOS, "box": Image.Resampling.BOX}
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_EXIF_ORIENTATION_TAG = 0x0112


class ImageReadError(Exception):
    """An image file that cannot be decoded; the message is the decoder's reason."""


def is_image_file(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_image_files(directory: str) -> List[str]:
    """Sorted paths of the images directly in `directory`; hidden files are skipped like glob('*')."""
    names = [n for n in os.listdir(directory) if not n.startswith(".") and is_image_file(n)]
    paths = [os.path.join(directory, n) for n in names]
    return sorted(p for p in paths if os.path.isfile(p))


def probe_image(path: str) -> Tuple[int, int]:
    """Decode the whole image (JPEG at reduced scale, which still reads every byte) and return
    its (width, height) after EXIF orientation. Raises ImageReadError if it cannot be decoded."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(_EXIF_ORIENTATION_TAG)
            if image.format == "JPEG":
                image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
            image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ImageReadError(str(error) or type(error).__name__) from None
    if orientation in _TRANSPOSING_ORIENTATIONS:
        return height, width
    return width, height


def load_image(path: str, keep_alpha: bool = False) -> np.ndarray:
    """uint8 HxWx3 RGB, or HxWx4 RGBA with `keep_alpha`; EXIF orientation applied.

    Without `keep_alpha`, transparency is composited on white (not dropped, which would expose
    whatever colour the transparent pixels happen to hold).
    """
    try:
        with Image.open(path) as image:
            ImageOps.exif_transpose(image, in_place=True)
            if keep_alpha:
                image = image.convert("RGBA")
            elif has_transparency(image):
                white = Image.new("RGBA", image.size, (255, 255, 255, 255))
                image = Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
            else:
                image = image.convert("RGB")
            return np.array(image, np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ImageReadError(f"{path}: {error}") from None


def has_transparency(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info


def resize_image(image: np.ndarray, size: Tuple[int, int], interpolation: Optional[str] = None) -> np.ndarray:
    """Resize to (width, height); by default INTER_AREA when shrinking, Lanczos when enlarging."""
    height, width = image.shape[:2]
    if interpolation is None:
        interpolation = "area" if width >= size[0] and height >= size[1] else "lanczos"
    if interpolation in _PIL_INTERPOLATION:
        return np.array(Image.fromarray(image).resize(size, resample=_PIL_INTERPOLATION[interpolation]))
    return cv2.resize(image, size, interpolation=_CV2_INTERPOLATION[interpolation])


def fit_to_bucket(
    image: np.ndarray,
    bucket_reso: Tuple[int, int],
    resized_size: Tuple[int, int],
    interpolation: Optional[str] = None,
    crop_rng: Optional[random.Random] = None,
):
    """Resize to `resized_size` and crop to `bucket_reso` (centre, or random with `crop_rng`).

    Returns (image, original_size, crop_ltrb) as sd-scripts' trim_and_resize_if_required does;
    the crop box does not reflect a random crop, as in sd-scripts.
    """
    height, width = image.shape[:2]
    original_size = (width, height)
    if (width, height) != tuple(resized_size):
        image = resize_image(image, tuple(resized_size), interpolation)
    height, width = image.shape[:2]

    if width > bucket_reso[0]:
        excess = width - bucket_reso[0]
        left = excess // 2 if crop_rng is None else crop_rng.randint(0, excess)
        image = image[:, left : left + bucket_reso[0]]
    if height > bucket_reso[1]:
        excess = height - bucket_reso[1]
        top = excess // 2 if crop_rng is None else crop_rng.randint(0, excess)
        image = image[top : top + bucket_reso[1]]

    if image.shape[:2] != (bucket_reso[1], bucket_reso[0]):
        raise ValueError(f"resized image {image.shape[1]}x{image.shape[0]} does not cover bucket {bucket_reso}")
    return image, original_size, crop_ltrb(bucket_reso, original_size)


def color_augment(image: np.ndarray, rng: random.Random) -> np.ndarray:
    """sd-scripts' weak colour augmentation on an RGB uint8 image (a third of the time: a hue
    shift of up to 8 or a gamma in [0.95, 1.05]). Like sd-scripts, the array goes through OpenCV's
    BGR conversion, so the hue moves in the mirrored direction; kept for identical statistics."""
    if rng.random() > 0.33:
        return image
    if rng.random() > 0.5:
        hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
        hue_shift = rng.uniform(-8, 8)
        if hue_shift < 0:
            hue_shift = 180 + hue_shift
        hsv[:, :, 0] = (hsv[:, :, 0] + hue_shift) % 180
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    gamma = rng.uniform(0.95, 1.05)
    return np.clip(image**gamma, 0, 255).astype(np.uint8)


# ToTensor + Normalize(0.5, 0.5) for each uint8 value, in float32 exactly as torchvision computes it
_UINT8_TO_UNIT = (np.arange(256, dtype=np.float32) / np.float32(255.0) - np.float32(0.5)) / np.float32(0.5)


def to_model_input(image: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 -> float32 3xHxW in [-1, 1]. OpenCV's table lookup gives the same values about
    three times faster than the float arithmetic (it matters: this runs on every image, every step)."""
    planes = np.ascontiguousarray(image.transpose(2, 0, 1))
    channels, height, width = planes.shape
    return cv2.LUT(planes.reshape(channels * height, width), _UINT8_TO_UNIT).reshape(channels, height, width)


def sdxl_size_condition(original_size, crop_box, target_size, flipped: bool):
    """SDXL's (original_size_hw, crop_top_left, target_size_hw) for one image, as sd-scripts.

    `original_size` and `target_size` are (width, height); `crop_box` is crop_ltrb's result. After
    a horizontal flip the left edge is measured from the mirrored side: target width - right.
    """
    left = target_size[0] - crop_box[2] if flipped else crop_box[0]
    original_hw = (int(original_size[1]), int(original_size[0]))
    crop_top_left = (int(crop_box[1]), int(left))
    target_hw = (int(target_size[1]), int(target_size[0]))
    return original_hw, crop_top_left, target_hw
