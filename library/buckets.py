"""Aspect-ratio buckets, computed exactly as sd-scripts' BucketManager does.

A bucket is a (width, height) resolution. Every image goes to one bucket and is resized so that it
covers the bucket, then cropped to it; a batch only ever holds images of one bucket.

- `make_bucket_resolutions(max_reso, min_size, max_size, divisible)`: the predefined bucket list.
- `BucketAssigner(...).select(width, height) -> BucketChoice`: the bucket an image goes to, the size
  it is resized to before cropping, and the aspect-ratio error.
- `crop_ltrb(bucket_reso, image_size)`: the crop box sd-scripts reports for SDXL's conditioning.
- `bucket_table_lines(...)`: the table printed before training (same lines as sd-scripts).

All sizes are (width, height), as in sd-scripts.
"""

import math
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

Size = Tuple[int, int]


def make_bucket_resolutions(max_reso: Size, min_size: int = 256, max_size: int = 1024, divisible: int = 64) -> List[Size]:
    """Bucket resolutions whose area stays within max_reso's area, sides multiples of `divisible`.

    For each width from min_size to max_size, the tallest height that keeps the area is taken (and
    its transpose), plus the largest square. Sorted as (width, height) tuples.
    """
    max_area = max_reso[0] * max_reso[1]
    resolutions = set()

    square_side = int(math.sqrt(max_area) // divisible) * divisible
    resolutions.add((square_side, square_side))

    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resolutions.add((width, height))
            resolutions.add((height, width))
        width += divisible

    return sorted(resolutions)


class BucketChoice(NamedTuple):
    reso: Size  # the bucket (width, height)
    resized_size: Size  # the image is resized to this before the crop to `reso`
    ar_error: float  # bucket aspect ratio minus image aspect ratio


class BucketAssigner:
    """Assigns images to buckets the way sd-scripts' BucketManager.select_bucket does.

    Without `no_upscale`, an image goes to the predefined bucket with the nearest aspect ratio and
    is scaled (up or down) to cover it. With `no_upscale`, images larger than the maximum area are
    scaled down keeping their aspect ratio, and the bucket is the scaled size floored to
    `reso_steps` (so images are only ever cropped, never upscaled).
    """

    def __init__(self, max_reso: Size, reso_steps: Optional[int], no_upscale: bool, predefined: Optional[Sequence[Size]]):
        if no_upscale and predefined is not None:
            raise ValueError("predefined buckets are not used with no_upscale")
        if not no_upscale and not predefined:
            raise ValueError("predefined buckets are required unless no_upscale")
        self.max_area = max_reso[0] * max_reso[1]
        self.reso_steps = reso_steps
        self.no_upscale = no_upscale
        self.predefined = list(predefined) if predefined is not None else []
        self._predefined_set = set(self.predefined)
        self._predefined_ratios = np.array([w / h for w, h in self.predefined])

    def select(self, image_width: int, image_height: int) -> BucketChoice:
        aspect_ratio = image_width / image_height
        if self.no_upscale:
            reso, resized_size = self._select_without_upscale(image_width, image_height, aspect_ratio)
        else:
            reso, resized_size = self._select_predefined(image_width, image_height, aspect_ratio)
        return BucketChoice(reso, resized_size, reso[0] / reso[1] - aspect_ratio)

    def _select_predefined(self, image_width: int, image_height: int, aspect_ratio: float) -> Tuple[Size, Size]:
        reso = (image_width, image_height)
        if reso not in self._predefined_set:
            # argmin takes the first of equal errors, so ties resolve to the smaller (w, h) like sd-scripts
            nearest = int(np.abs(self._predefined_ratios - aspect_ratio).argmin())
            reso = self.predefined[nearest]

        if aspect_ratio > reso[0] / reso[1]:  # image is wider than the bucket: match heights
            scale = reso[1] / image_height
        else:
            scale = reso[0] / image_width
        resized_size = (int(image_width * scale + 0.5), int(image_height * scale + 0.5))
        return reso, resized_size

    def _select_without_upscale(self, image_width: int, image_height: int, aspect_ratio: float) -> Tuple[Size, Size]:
        if image_width * image_height > self.max_area:
            resized_width = math.sqrt(self.max_area * aspect_ratio)
            resized_height = self.max_area / resized_width

            # round either the width or the height to steps, whichever keeps the aspect ratio better
            width_rounded = self._round_to_steps(resized_width)
            height_for_width = self._round_to_steps(width_rounded / aspect_ratio)
            ar_width_rounded = width_rounded / height_for_width

            height_rounded = self._round_to_steps(resized_height)
            width_for_height = self._round_to_steps(height_rounded * aspect_ratio)
            ar_height_rounded = width_for_height / height_rounded

            if abs(ar_width_rounded - aspect_ratio) < abs(ar_height_rounded - aspect_ratio):
                resized_size = (width_rounded, int(width_rounded / aspect_ratio + 0.5))
            else:
                resized_size = (int(height_rounded * aspect_ratio + 0.5), height_rounded)
        else:
            resized_size = (image_width, image_height)

        # the bucket is never larger than the resized image: crop, never pad
        reso = (resized_size[0] - resized_size[0] % self.reso_steps, resized_size[1] - resized_size[1] % self.reso_steps)
        return reso, resized_size

    def _round_to_steps(self, x: float) -> int:
        x = int(x + 0.5)
        return x - x % self.reso_steps


def crop_ltrb(bucket_reso: Size, image_size: Size) -> Tuple[float, float, float, float]:
    """The crop box (left, top, right, bottom) sd-scripts records for SDXL size conditioning.

    This follows Stability AI's preprocessing as sd-scripts implements it: the image is fitted
    *inside* the bucket and the box is where it would sit, centred. One coordinate pair is a float,
    exactly as sd-scripts computes (and stores in its latent caches); the conditioning truncates it
    with int(). The right edge is kept so a horizontal flip can mirror the left edge.
    """
    bucket_ar = bucket_reso[0] / bucket_reso[1]
    image_ar = image_size[0] / image_size[1]
    if bucket_ar > image_ar:
        fitted_width = bucket_reso[1] * image_ar
        fitted_height = bucket_reso[1]
    else:
        fitted_width = bucket_reso[0]
        fitted_height = bucket_reso[0] / image_ar
    left = (bucket_reso[0] - fitted_width) // 2
    top = (bucket_reso[1] - fitted_height) // 2
    return left, top, left + fitted_width, top + fitted_height


def bucket_info(bucket_counts: Dict[Size, int], ar_errors: Sequence[float]) -> dict:
    """The `bucket_info` dict sd-scripts stores in ss_bucket_info / ss_datasets.

    `bucket_counts` maps each used bucket to its image count including repeats; buckets are
    numbered in sorted (width, height) order; the mean error is over images without repeats.
    """
    buckets = {i: {"resolution": reso, "count": count} for i, (reso, count) in enumerate(sorted(bucket_counts.items()))}
    mean_ar_error = float(np.mean(np.abs(ar_errors))) if len(ar_errors) else 0
    return {"buckets": buckets, "mean_img_ar_error": mean_ar_error}


def bucket_table_lines(info: dict) -> List[str]:
    """The lines sd-scripts logs for a bucketed dataset, from `bucket_info(...)`."""
    lines = ["number of images (including repeats) / 各bucketの画像枚数（繰り返し回数を含む）"]
    for i, bucket in info["buckets"].items():
        lines.append(f"bucket {i}: resolution {bucket['resolution']}, count: {bucket['count']}")
    lines.append(f"mean ar error (without repeats): {info['mean_img_ar_error']}")
    return lines
