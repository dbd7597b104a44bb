"""Latent and text-encoder-output caches, in memory or as sd-scripts' .npz files beside the images.

    cache_latents(group, encode_fn, vae_batch_size=1, to_disk=False, skip_cache_check=False)
    cache_text_encoder_outputs(group, encode_fn, to_disk=False, skip_cache_check=False)

The models are injected, so this module needs none:
- latents: `encode_fn(images) -> latents`, images float32 [B, 3, H, W] in [-1, 1], latents float32
  [B, 4, H/8, W/8] -- the VAE's latent_dist.sample() *unscaled*, as sd-scripts stores it (the
  trainer multiplies by the scale factor), so caches move between the two tools.
- text encoders: `encode_fn(captions) -> (hidden_state1, hidden_state2, pool2)`, each [B, ...].

Files (sd-scripts' names and arrays):
- `<stem>_<WWWW>x<HHHH>_sdxl.npz` (W, H: the image size): `latents` [4, h, w], `original_size`
  [w, h], `crop_ltrb` [l, t, r, b], `latents_flipped` with flip_aug, `alpha_mask` [H, W] with
  alpha_mask.
- `<stem>_te_outputs.npz`: `hidden_state1`, `hidden_state2`, `pool2`, plus a `caption` array that
  sd-scripts ignores and we use to notice a caption that changed since the file was written.

An existing file is reused only if its arrays fit (latent size = bucket / 8, flipped latents and
alpha mask present when needed, same original size; same caption and output shapes) -- otherwise
it is rebuilt. `skip_cache_check` trusts any existing file, as sd-scripts' --skip_cache_check.
Files are written to a temporary name in the same folder, then renamed into place.
"""

import logging
import os
import random
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from library.captions import process_caption
from library.errors import UserError
from library.images import fit_to_bucket, load_image, to_model_input

logger = logging.getLogger(__name__)

LATENTS_SUFFIX = "_sdxl.npz"
TEXT_ENCODER_OUTPUTS_SUFFIX = "_te_outputs.npz"
TEXT_ENCODER_OUTPUT_NAMES = ("hidden_state1", "hidden_state2", "pool2")
LATENT_STRIDE = 8  # VAE downsampling


@dataclass
class CachedLatents:
    latents: np.ndarray  # [C, H/8, W/8]
    latents_flipped: Optional[np.ndarray]
    original_size: Tuple[int, int]  # (width, height) before resizing
    crop_ltrb: Tuple[float, ...]
    alpha_mask: Optional[np.ndarray]  # [H, W]


def latents_npz_path(image_path: str, image_size: Tuple[int, int]) -> str:
    return f"{os.path.splitext(image_path)[0]}_{image_size[0]:04d}x{image_size[1]:04d}{LATENTS_SUFFIX}"


def text_encoder_outputs_npz_path(image_path: str) -> str:
    return os.path.splitext(image_path)[0] + TEXT_ENCODER_OUTPUTS_SUFFIX


def _rank_owns(file_index: int, rank: int, world_size: int) -> bool:
    """Under data parallelism each cache file is checked and written by one rank: file i by rank i mod W.
    The index counts distinct files in dataset order, so every rank assigns them alike before any exists."""
    return file_index % world_size == rank


# ---- latents ----


def cache_latents(group, encode_fn: Callable, vae_batch_size: int = 1, to_disk: bool = False, skip_cache_check: bool = False,
                  rank: int = 0, world_size: int = 1):
    """Encode every image of the group once; in memory, or into .npz files (reusing valid ones).

    With `world_size` ranks and `to_disk`, rank r checks and encodes the files whose index is r mod
    world_size (the caller waits for every rank before reading them); in memory, each rank needs them all."""
    to_encode, users_of_file = [], {}
    for _, item in group.image_items():
        if not to_disk:
            to_encode.append(item)
            continue
        path = latents_npz_path(item.path, item.image_size)
        if path in users_of_file:  # the same image in another dataset
            check_same_latents_needed(users_of_file[path][0], item, path)
            users_of_file[path].append(item)
            continue
        users_of_file[path] = [item]
        if not _rank_owns(len(users_of_file) - 1, rank, world_size):
            continue
        problem = latents_cache_problem(path, item, skip_cache_check)
        if problem is None:
            continue
        if problem != "missing":
            logger.info("rebuilding %s: %s", path, problem)
        to_encode.append(item)
    if to_disk:
        mine = -(-(len(users_of_file) - rank) // world_size)
        logger.info("latents: %d cache files reused, %d to encode%s", mine - len(to_encode), len(to_encode),
                    f" (rank {rank}'s share of {len(users_of_file)})" if world_size > 1 else "")

    batches = latent_batches(to_encode, vae_batch_size)
    with ThreadPoolExecutor(1, thread_name_prefix="cache-load") as loader:  # load the next batch while encoding
        upcoming = loader.submit(prepare_images, batches[0]) if batches else None
        for index in tqdm(range(len(batches)), desc="caching latents", smoothing=0):
            images, original_sizes, crop_boxes, alpha_masks = upcoming.result()
            if index + 1 < len(batches):
                upcoming = loader.submit(prepare_images, batches[index + 1])
            store_latents(batches[index], encode_fn, images, original_sizes, crop_boxes, alpha_masks, to_disk)

    for path, items in users_of_file.items():
        for item in items:
            item.latents_npz = path


def check_same_latents_needed(first, other, path: str) -> None:
    if (first.bucket_reso, first.subset.flip_aug, first.subset.alpha_mask) != (
        other.bucket_reso,
        other.subset.flip_aug,
        other.subset.alpha_mask,
    ):
        raise UserError(
            f"{first.path} is used by two datasets with different buckets or flip_aug/alpha_mask, but {path} "
            "can hold only one: use --cache_latents without _to_disk, or the same settings"
        )


def latent_batches(items: List, vae_batch_size: int) -> List[List]:
    """Group images that share a bucket and flip/alpha settings, smallest buckets first (sd-scripts' order)."""

    def condition(item):
        return item.bucket_reso[0] * item.bucket_reso[1], item.bucket_reso, item.subset.flip_aug, item.subset.alpha_mask

    batches: List[List] = []
    for item in sorted(items, key=condition):
        if batches and len(batches[-1]) < vae_batch_size and condition(batches[-1][0]) == condition(item):
            batches[-1].append(item)
        else:
            batches.append([item])
    return batches


def prepare_images(items: Sequence):
    """Load, resize and centre-crop a batch as the training loader would (no random crop or colour
    augmentation: both are refused with cached latents)."""
    images, original_sizes, crop_boxes, alpha_masks = [], [], [], []
    for item in items:
        pixels = load_image(item.path, keep_alpha=item.subset.alpha_mask)
        pixels, original_size, crop_box = fit_to_bucket(pixels, item.bucket_reso, item.resized_size, item.resize_interpolation)
        images.append(to_model_input(pixels[:, :, :3]))
        original_sizes.append(original_size)
        crop_boxes.append(crop_box)
        alpha_masks.append(pixels[:, :, 3].astype(np.float32) / np.float32(255.0) if item.subset.alpha_mask else None)
    return np.stack(images), original_sizes, crop_boxes, alpha_masks


def store_latents(items, encode_fn, images, original_sizes, crop_boxes, alpha_masks, to_disk: bool) -> None:
    latents = encode_checked(encode_fn, images, items)
    flipped = encode_checked(encode_fn, np.ascontiguousarray(images[:, :, :, ::-1]), items) if items[0].subset.flip_aug else None
    for i, item in enumerate(items):
        cached = CachedLatents(
            latents=latents[i],
            latents_flipped=None if flipped is None else flipped[i],
            original_size=original_sizes[i],
            crop_ltrb=crop_boxes[i],
            alpha_mask=alpha_masks[i],
        )
        if to_disk:
            save_latents_npz(latents_npz_path(item.path, item.image_size), cached)
        else:
            item.latents = cached


def encode_checked(encode_fn: Callable, images: np.ndarray, items: Sequence) -> np.ndarray:
    latents = np.asarray(encode_fn(images), dtype=np.float32)
    expected = (len(items), images.shape[2] // LATENT_STRIDE, images.shape[3] // LATENT_STRIDE)
    if latents.ndim != 4 or (latents.shape[0], *latents.shape[2:]) != expected:
        raise ValueError(f"encode_fn returned latents of shape {latents.shape} for images of shape {images.shape}")
    for item, latent in zip(items, latents):
        if np.isnan(latent).any():
            raise UserError(f"NaN in the latents of {item.path}: the VAE overflowed (use a float32 VAE)")
    return latents


def save_latents_npz(path: str, cached: CachedLatents) -> None:
    arrays = {
        "latents": cached.latents.astype(np.float32),
        "original_size": np.array(cached.original_size),
        "crop_ltrb": np.array(cached.crop_ltrb),
    }
    if cached.latents_flipped is not None:
        arrays["latents_flipped"] = cached.latents_flipped.astype(np.float32)
    if cached.alpha_mask is not None:
        arrays["alpha_mask"] = cached.alpha_mask.astype(np.float32)
    write_npz(path, arrays)


def load_latents_npz(path: str) -> CachedLatents:
    with np.load(path) as data:
        return CachedLatents(
            latents=data["latents"],
            latents_flipped=data["latents_flipped"] if "latents_flipped" in data.files else None,
            original_size=tuple(data["original_size"].tolist()),
            crop_ltrb=tuple(data["crop_ltrb"].tolist()),
            alpha_mask=data["alpha_mask"] if "alpha_mask" in data.files else None,
        )


def latents_cache_problem(path: str, item, skip_cache_check: bool) -> Optional[str]:
    """None if the file can be used for `item`, else why not."""
    if not os.path.exists(path):
        return "missing"
    if skip_cache_check:
        return None
    width, height = item.bucket_reso
    latent_size = (height // LATENT_STRIDE, width // LATENT_STRIDE)
    try:
        with np.load(path) as data:
            names = set(data.files)
            missing = {"latents", "original_size", "crop_ltrb"} - names
            if item.subset.flip_aug:
                missing |= {"latents_flipped"} - names
            if item.subset.alpha_mask:
                missing |= {"alpha_mask"} - names
            if missing:
                return f"no {', '.join(sorted(missing))}"
            for name in ("latents", "latents_flipped") if item.subset.flip_aug else ("latents",):
                if data[name].ndim != 3 or data[name].shape[1:] != latent_size:
                    return f"{name} has shape {data[name].shape}, the bucket {width}x{height} needs (*, {latent_size[0]}, {latent_size[1]})"
            if item.subset.alpha_mask and data["alpha_mask"].shape != (height, width):
                return f"alpha_mask has shape {data['alpha_mask'].shape}, expected {(height, width)}"
            if tuple(data["original_size"].tolist()) != tuple(item.image_size):
                return f"original_size {data['original_size'].tolist()} differs from the image's {list(item.image_size)}"
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
        return f"unreadable ({error})"
    return None


# ---- text encoder outputs ----


def cache_text_encoder_outputs(
    group, encode_fn: Callable, to_disk: bool = False, skip_cache_check: bool = False, batch_size: Optional[int] = None,
    rank: int = 0, world_size: int = 1,
):
    """Encode every image's caption once (batches of `batch_size`, default: each dataset's); files are
    split across ranks as in `cache_latents`."""
    to_encode = []  # (batch size, item, caption)
    caption_of_file: Dict[str, str] = {}
    shapes = []  # per-image output shapes of this encoder, measured once if a file must be checked
    for dataset, item in group.image_items():
        caption = text_encoder_caption(item)
        if to_disk:
            path = item.text_encoder_outputs_npz = text_encoder_outputs_npz_path(item.path)
            if path in caption_of_file:  # the same image in another dataset
                if caption_of_file[path] != caption:
                    raise UserError(
                        f"{item.path} is used with two different captions, but {path} can hold only one: "
                        "use --cache_text_encoder_outputs without _to_disk"
                    )
                continue
            caption_of_file[path] = caption
            if not _rank_owns(len(caption_of_file) - 1, rank, world_size):
                continue
            if os.path.exists(path) and skip_cache_check:
                continue
            if os.path.exists(path):
                if not shapes:
                    shapes = [np.shape(output)[1:] for output in encode_text_checked(encode_fn, [caption])]
                problem = text_encoder_cache_problem(path, caption, shapes)
                if problem is None:
                    continue
                logger.info("rebuilding %s: %s", path, problem)
        to_encode.append((batch_size or dataset.batch_size, item, caption))

    for batch in tqdm(text_batches(to_encode), desc="caching text encoder outputs", smoothing=0):
        captions = [caption for _, caption in batch]
        outputs = encode_text_checked(encode_fn, captions)
        for i, (item, caption) in enumerate(batch):
            per_image = tuple(np.asarray(output[i], dtype=np.float32) for output in outputs)
            if to_disk:
                arrays = dict(zip(TEXT_ENCODER_OUTPUT_NAMES, per_image))
                write_npz(item.text_encoder_outputs_npz, {**arrays, "caption": np.array(caption)})
            else:
                item.text_encoder_outputs = per_image


def text_encoder_caption(item) -> str:
    """The caption the cache encodes: the subset's fixed transforms (prefix, suffix, first line,
    secondary separator); random transforms are refused with cached outputs, so no rng is drawn."""
    return process_caption(item.caption, item.subset.captions, random.Random(0), epoch=1)


def text_batches(to_encode: List) -> List[List]:
    batches: List[List] = []
    for size, item, caption in to_encode:
        if not batches or len(batches[-1]) >= size:
            batches.append([])
        batches[-1].append((item, caption))
    return batches


def text_encoder_cache_problem(path: str, caption: str, shapes: Tuple[Tuple[int, ...], ...]) -> Optional[str]:
    try:
        with np.load(path) as data:
            missing = set(TEXT_ENCODER_OUTPUT_NAMES) - set(data.files)
            if missing:
                return f"no {', '.join(sorted(missing))}"
            for name, shape in zip(TEXT_ENCODER_OUTPUT_NAMES, shapes):
                if data[name].shape != shape:
                    return f"{name} has shape {data[name].shape}, the text encoder gives {shape}"
            if "caption" in data.files and str(data["caption"]) != caption:
                return "the caption changed"
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
        return f"unreadable ({error})"
    return None


def encode_text_checked(encode_fn: Callable, captions: List[str]) -> Tuple[np.ndarray, ...]:
    outputs = tuple(encode_fn(captions))
    if len(outputs) != len(TEXT_ENCODER_OUTPUT_NAMES) or any(len(output) != len(captions) for output in outputs):
        raise ValueError(f"encode_fn must return {TEXT_ENCODER_OUTPUT_NAMES}, each with one row per caption")
    return outputs


def load_text_encoder_outputs_npz(path: str) -> Tuple[np.ndarray, ...]:
    with np.load(path) as data:
        return tuple(data[name] for name in TEXT_ENCODER_OUTPUT_NAMES)


def write_npz(path: str, arrays: Dict[str, np.ndarray]) -> None:
    """Write atomically: a reader (or a crash) never sees a half-written cache file."""
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        with open(temporary, "wb") as f:
            np.savez(f, **arrays)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
