"""Training datasets: images, captions and buckets in, batches of numpy arrays out.

    group = build_dataset_group(args, sdxl=True)     # validates everything, prints the bucket table
    group.set_max_train_steps(max_train_steps, gradient_accumulation_steps)   # for token warmup
    for batch in group.iter_epoch(epoch):           # epoch counts from 1, as in sd-scripts
        ...                                         # Batch: plain numpy arrays, one bucket

`build_dataset_group(args, sdxl=True) -> DatasetGroup` reads --dataset_config or the command-line
fallback, scans every folder and metadata file, decodes every image once (a corrupt or truncated
image is a UserError before training, or is skipped and listed with --skip_bad_images), assigns
buckets exactly as sd-scripts, balances regularization repeats as sd-scripts and logs the table.

`DatasetGroup`:
- `num_train_images`, `num_reg_images` (with repeats, as sd-scripts counts them),
  `num_batches_per_epoch`, `seed`, `datasets`.
- `batches_for_epoch(epoch) -> list[BatchRef]`: the epoch's batch order, a pure function of
  (seed, epoch), so a resumed run rebuilds it exactly. Each BatchRef lists its bucket's images.
- `shard(rank, world_size)`: data parallelism; from then on the batch order and count are this rank's.
- `load_batch(ref, epoch) -> Batch`: flips, random crops, colour augmentation and caption
  randomness come from a generator seeded by (seed, epoch, dataset, image slot): pure as well.
- `iter_epoch(epoch, start_batch=0, num_workers=None)`: yields the epoch's Batches in order while
  background threads load the next ones (threads, not processes: decoding and resizing release
  the GIL, and nothing has to be pickled or forked next to MindSpore).
- `metadata()`: the dataset values sd-scripts writes into the LoRA's ss_* metadata.

Latent and text-encoder caches are filled by library/latent_cache.py; batches then carry `latents`
(and `text_encoder_outputs`) instead of `images`.
"""

import argparse
import json
import logging
import math
import os
import random
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Optional, Tuple

import numpy as np
from tqdm import tqdm

from library import buckets as bucketing
from library.captions import caption_from_metadata, count_tags, process_caption, read_caption_file
from library.dataset_args import parse_resolution, refuse_unsupported_arguments
from library.dataset_config import DREAMBOOTH, DatasetConfig, SubsetConfig, load_dataset_configs
from library.errors import UserError
from library.images import (
    IMAGE_EXTENSIONS,
    ImageReadError,
    color_augment,
    fit_to_bucket,
    list_image_files,
    load_image,
    probe_image,
    sdxl_size_condition,
    to_model_input,
)
from library.latent_cache import LATENT_STRIDE, CachedLatents, load_latents_npz, load_text_encoder_outputs_npz

logger = logging.getLogger(__name__)

IMAGE_INFO_CACHE_FILE = "metadata_cache.json"  # sd-scripts' cache_info file


@dataclass
class ImageItem:
    """One image of a dataset, with everything needed to turn it into a batch row."""

    path: str
    caption: str  # as read (caption file, class tokens or metadata), before per-step processing
    subset: SubsetConfig
    is_reg: bool
    num_repeats: int  # regularization images get extra repeats to balance, as in sd-scripts
    resize_interpolation: Optional[str]
    tags: Optional[str] = None  # fine-tuning metadata tags, counted for ss_tag_frequency
    image_size: Tuple[int, int] = (0, 0)  # (width, height) after EXIF orientation
    bucket_reso: Tuple[int, int] = (0, 0)
    resized_size: Tuple[int, int] = (0, 0)
    # caches, filled by library/latent_cache.py
    latents: Optional[CachedLatents] = None
    latents_npz: Optional[str] = None
    text_encoder_outputs: Optional[Tuple[np.ndarray, ...]] = None
    text_encoder_outputs_npz: Optional[str] = None


@dataclass
class Bucket:
    reso: Tuple[int, int]
    slots: List[int]  # one slot per image repeat; slot ids index TrainDataset.slot_items


class BatchRef(NamedTuple):
    position: int  # index in the epoch's batch order (this rank's order under data parallelism)
    dataset_index: int
    bucket_index: int
    slots: Tuple[int, ...]
    peer_latent_sizes: Optional[Tuple[Tuple[int, int, int], ...]] = None  # data parallel: every rank's (B, h, w)


@dataclass
class Batch:
    """One batch of one bucket. Arrays are numpy; B is the batch size, H, W the bucket size."""

    images: Optional[np.ndarray]  # float32 [B, 3, H, W] in [-1, 1], None when latents are cached
    latents: Optional[np.ndarray]  # float32 [B, 4, H/8, W/8] (VAE sample, unscaled), or None
    captions: List[str]
    original_sizes_hw: np.ndarray  # int64 [B, 2]
    crop_top_lefts: np.ndarray  # int64 [B, 2]
    target_sizes_hw: np.ndarray  # int64 [B, 2]
    loss_weights: np.ndarray  # float32 [B]: prior_loss_weight for regularization images, else 1
    flipped: np.ndarray  # bool [B]
    alpha_masks: Optional[np.ndarray] = None  # float32 [B, H, W] in [0, 1] when alpha_mask is on
    text_encoder_outputs: Optional[Tuple[np.ndarray, ...]] = None  # stacked cached outputs
    custom_attributes: List[dict] = field(default_factory=list)
    image_paths: List[str] = field(default_factory=list)
    peer_latent_sizes: Optional[Tuple[Tuple[int, int, int], ...]] = None  # data parallel: every rank's (B, h, w)


class TrainDataset:
    """The images of one [[datasets]] table, assigned to buckets.

    A slot is one repeat of one image; `slot_items[slot]` is the index of its image in `items`.
    """

    def __init__(self, index: int, config: DatasetConfig, items: List[ImageItem], image_counts: Dict[SubsetConfig, int]):
        self.index = index
        self.config = config
        self.batch_size = config.batch_size
        self.image_counts = image_counts  # per subset, without repeats
        self.num_train_images = sum(n * s.num_repeats for s, n in image_counts.items() if not s.is_reg)
        self.num_reg_images = sum(n * s.num_repeats for s, n in image_counts.items() if s.is_reg)
        if self.num_train_images == 0:
            raise UserError(f"{config.source} has only regularization images (is_reg); add training images")
        self.tag_frequency = tag_frequency(config, image_counts, items)  # all images, as sd-scripts counts them
        self.items = register_with_balanced_regularization(items, self.num_train_images, config.source)
        self.buckets, self.slot_items, self.bucket_info = assign_buckets(config, self.items)

    @property
    def num_batches(self) -> int:
        return sum(-(-len(bucket.slots) // self.batch_size) for bucket in self.buckets)


def register_with_balanced_regularization(items: List[ImageItem], num_train_images: int, source: str) -> List[ImageItem]:
    """Training images, then as many regularization draws as training draws (sd-scripts' loop:
    reg images are added one by one until their repeats reach the training count, then get one
    more repeat each in turn; surplus reg images are left out)."""
    train = [item for item in items if not item.is_reg]
    regularization = [item for item in items if item.is_reg]
    if not regularization:
        return train
    if num_train_images < sum(item.num_repeats for item in regularization):
        logger.warning("some regularization images of %s are not used: there are more of them than training images", source)
    registered, count, first_pass = [], 0, True
    while count < num_train_images:
        for item in regularization:
            if first_pass:
                registered.append(item)
                count += item.num_repeats
            else:
                item.num_repeats += 1
                count += 1
            if count >= num_train_images:
                break
        first_pass = False
    return train + registered


def tag_frequency(config: DatasetConfig, image_counts: Dict[SubsetConfig, int], items: List[ImageItem]) -> dict:
    """sd-scripts' tag_frequency: per folder name, the tags of its captions (DreamBooth), or per
    metadata file name, the tags of its `tags` fields (fine-tuning)."""
    frequency: Dict[str, Dict[str, int]] = {}
    for subset in image_counts:
        subset_items = [item for item in items if item.subset is subset]
        if subset.kind == DREAMBOOTH:
            name, texts = os.path.basename(subset.image_dir), [item.caption for item in subset_items]
        else:
            name, texts = os.path.basename(subset.metadata_file), [item.tags for item in subset_items if item.tags is not None]
        count_tags(texts, frequency.setdefault(name, {}))
    return frequency


def assign_buckets(config: DatasetConfig, items: List[ImageItem]):
    """Put each image in its bucket (sd-scripts' make_buckets): returns the buckets sorted by
    resolution, the slot -> item table, and bucket_info (None without bucketing)."""
    width, height = config.resolution
    if not config.enable_bucket:
        assigner = bucketing.BucketAssigner((width, height), None, False, [(width, height)])
    elif config.bucket_no_upscale:
        logger.warning("min_bucket_reso and max_bucket_reso are ignored with bucket_no_upscale: buckets follow image sizes")
        assigner = bucketing.BucketAssigner((width, height), config.bucket_reso_steps, True, None)
    else:
        resolutions = bucketing.make_bucket_resolutions(
            (width, height), config.min_bucket_reso, config.max_bucket_reso, config.bucket_reso_steps
        )
        assigner = bucketing.BucketAssigner((width, height), config.bucket_reso_steps, False, resolutions)

    ar_errors = []
    for item in items:
        choice = assigner.select(*item.image_size)
        if min(choice.reso) <= 0:
            raise UserError(
                f"image {item.path} ({item.image_size[0]}x{item.image_size[1]}) is smaller than bucket_reso_steps "
                f"({config.bucket_reso_steps}) with bucket_no_upscale; enlarge or remove it"
            )
        item.bucket_reso, item.resized_size = choice.reso, choice.resized_size
        ar_errors.append(abs(choice.ar_error))

    slots_by_reso: Dict[Tuple[int, int], List[int]] = {}
    slot_items: List[int] = []
    for item_index, item in enumerate(items):
        for _ in range(item.num_repeats):
            slots_by_reso.setdefault(item.bucket_reso, []).append(len(slot_items))
            slot_items.append(item_index)
    buckets = [Bucket(reso, slots) for reso, slots in sorted(slots_by_reso.items())]

    info = None
    if config.enable_bucket:
        info = bucketing.bucket_info({bucket.reso: len(bucket.slots) for bucket in buckets}, ar_errors)
        for line in bucketing.bucket_table_lines(info):
            logger.info(line)
    return buckets, slot_items, info


# ---- the group: epochs, batches, background loading ----


class DatasetGroup:
    def __init__(self, datasets: List[TrainDataset], seed: int, num_workers: int = 8, persistent_workers: bool = False):
        self.datasets = datasets
        self.seed = seed
        self.num_workers = num_workers
        self.persistent_workers = persistent_workers
        self.num_train_images = sum(d.num_train_images for d in datasets)
        self.num_reg_images = sum(d.num_reg_images for d in datasets)
        self.max_train_steps = 0
        self.gradient_accumulation_steps = 1
        self._metadata: dict = {}
        self._executor: Optional[ThreadPoolExecutor] = None
        self._epoch_orders: Dict[int, Tuple[BatchRef, ...]] = {}
        self.validation: Optional["DatasetGroup"] = None  # the held-out images of validation_split
        self.rank, self.world_size = 0, 1

    def shard(self, rank: int, world_size: int) -> None:
        """Data parallelism: step k of an epoch takes the batches k*W .. k*W+W-1 of the epoch order, one per
        rank; an epoch that does not divide evenly is topped up from its first batches (as accelerate's
        even_batches), so every rank runs the same number of steps."""
        self.rank, self.world_size = rank, world_size
        self._epoch_orders = {}
        if "ss_num_batches_per_epoch" in self._metadata:  # sd-scripts records the per-process count
            self._metadata["ss_num_batches_per_epoch"] = self.num_batches_per_epoch

    @property
    def num_batches_per_epoch(self) -> int:
        """This rank's batches per epoch (all of them in a single process), as sd-scripts counts them."""
        return -(-sum(d.num_batches for d in self.datasets) // self.world_size)

    def set_max_train_steps(self, max_train_steps: int, gradient_accumulation_steps: int = 1) -> None:
        """Token warmup needs the total steps (for a fractional token_warmup_step) and the optimizer
        step of each batch, which is (batches so far) // gradient_accumulation_steps."""
        self.max_train_steps = max_train_steps
        self.gradient_accumulation_steps = gradient_accumulation_steps

    def image_items(self):
        """(dataset, item) for every distinct image, for the cache builders."""
        for dataset in self.datasets:
            for item in dataset.items:
                yield dataset, item

    def batches_for_epoch(self, epoch: int) -> List[BatchRef]:
        """This rank's batches of the epoch, in order (all of them in a single process)."""
        if epoch < 1:
            raise ValueError(f"epochs count from 1, as in sd-scripts (caption_dropout_every_n_epochs depends on it), got {epoch}")
        if epoch not in self._epoch_orders:
            order = self._epoch_order(epoch)
            if self.world_size > 1:
                order = self._rank_share(order)
            self._epoch_orders = {epoch: order}  # keep only the current epoch's
        return list(self._epoch_orders[epoch])

    def _rank_share(self, order: Tuple[BatchRef, ...]) -> Tuple[BatchRef, ...]:
        share = []
        for step in range(self.num_batches_per_epoch):
            peers = [order[(step * self.world_size + rank) % len(order)] for rank in range(self.world_size)]
            sizes = tuple(self._latent_size(ref) for ref in peers)
            share.append(peers[self.rank]._replace(position=step, peer_latent_sizes=sizes))
        return tuple(share)

    def _latent_size(self, ref: BatchRef) -> Tuple[int, int, int]:
        width, height = self.datasets[ref.dataset_index].buckets[ref.bucket_index].reso
        return len(ref.slots), height // LATENT_STRIDE, width // LATENT_STRIDE

    def _epoch_order(self, epoch: int) -> Tuple[BatchRef, ...]:
        # shuffle slots within each bucket, cut into batches, then shuffle the batches of all datasets
        rng = random.Random(f"{self.seed}/epoch/{epoch}")
        batches = []
        for dataset in self.datasets:
            for bucket_index, bucket in enumerate(dataset.buckets):
                slots = list(bucket.slots)
                rng.shuffle(slots)
                for start in range(0, len(slots), dataset.batch_size):
                    batches.append((dataset.index, bucket_index, tuple(slots[start : start + dataset.batch_size])))
        rng.shuffle(batches)
        return tuple(BatchRef(position, *batch) for position, batch in enumerate(batches))

    def load_batch(self, ref: BatchRef, epoch: int) -> Batch:
        if epoch < 1:
            raise ValueError(f"epochs count from 1, as in sd-scripts, got {epoch}")
        dataset = self.datasets[ref.dataset_index]
        batches_done = (epoch - 1) * self.num_batches_per_epoch + ref.position
        step = batches_done // self.gradient_accumulation_steps
        rows = [self._load_row(dataset, slot, epoch, step) for slot in ref.slots]
        batch = stack_rows(rows, dataset.config.prior_loss_weight)
        batch.peer_latent_sizes = ref.peer_latent_sizes
        return batch

    def iter_epoch(self, epoch: int, start_batch: int = 0, num_workers: Optional[int] = None):
        """Yield the epoch's batches from `start_batch` on, in order, loading ahead in threads
        (2 batches per thread in flight, like a DataLoader's prefetch; 0 threads loads inline)."""
        refs = self.batches_for_epoch(epoch)[start_batch:]
        workers = min(self.num_workers if num_workers is None else num_workers, os.cpu_count() or 1)
        if workers <= 0:
            for ref in refs:
                yield self.load_batch(ref, epoch)
            return

        executor = self._executor or ThreadPoolExecutor(workers, thread_name_prefix="dataset")
        if self.persistent_workers:
            self._executor = executor
        pending = deque()
        upcoming = iter(refs)
        try:
            for ref in upcoming:
                pending.append(executor.submit(self.load_batch, ref, epoch))
                if len(pending) >= 2 * workers:
                    break
            while pending:
                batch = pending.popleft().result()
                next_ref = next(upcoming, None)
                if next_ref is not None:
                    pending.append(executor.submit(self.load_batch, next_ref, epoch))
                yield batch
        finally:
            for future in pending:
                future.cancel()
            if executor is not self._executor:
                executor.shutdown(wait=True, cancel_futures=True)

    def close(self) -> None:
        """Stop the loading threads kept by --persistent_data_loader_workers."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def metadata(self) -> dict:
        """The dataset entries of sd-scripts' LoRA metadata (values not yet str()-ed; those sd-scripts
        stores as JSON are JSON strings already)."""
        return dict(self._metadata)

    def _rng(self, epoch: int, dataset_index: int, slot: int, purpose: str) -> random.Random:
        return random.Random(f"{self.seed}/{epoch}/{dataset_index}/{slot}/{purpose}")

    def _load_row(self, dataset: TrainDataset, slot: int, epoch: int, step: int) -> "Row":
        item = dataset.items[dataset.slot_items[slot]]
        image_rng = self._rng(epoch, dataset.index, slot, "image")
        flipped = item.subset.flip_aug and image_rng.random() < 0.5
        if item.latents is not None or item.latents_npz is not None:
            pixels = cached_latents_row(item, flipped)
        else:
            pixels = image_row(item, flipped, image_rng)

        caption_rng = self._rng(epoch, dataset.index, slot, "caption")
        caption = process_caption(item.caption, item.subset.captions, caption_rng, epoch, step, self.max_train_steps)
        te_outputs = item.text_encoder_outputs
        if te_outputs is None and item.text_encoder_outputs_npz is not None:
            te_outputs = load_text_encoder_outputs_npz(item.text_encoder_outputs_npz)
        return Row(
            item, pixels.image, pixels.latents, pixels.alpha_mask, caption, flipped, te_outputs,
            *sdxl_size_condition(pixels.original_size, pixels.crop_box, pixels.target_size, flipped),
        )


class PixelRow(NamedTuple):
    image: Optional[np.ndarray]
    latents: Optional[np.ndarray]
    alpha_mask: Optional[np.ndarray]
    original_size: Tuple[int, int]
    crop_box: tuple
    target_size: Tuple[int, int]


def image_row(item: ImageItem, flipped: bool, rng: random.Random) -> PixelRow:
    """Load, resize, crop, augment and flip an image, in sd-scripts' order of random draws."""
    subset = item.subset
    pixels = load_image(item.path, keep_alpha=subset.alpha_mask)
    crop_rng = rng if subset.random_crop else None
    pixels, original_size, crop_box = fit_to_bucket(pixels, item.bucket_reso, item.resized_size, item.resize_interpolation, crop_rng)
    if subset.color_aug:
        pixels = pixels.copy()
        pixels[:, :, :3] = color_augment(np.ascontiguousarray(pixels[:, :, :3]), rng)
    if flipped:
        pixels = pixels[:, ::-1]
    alpha_mask = pixels[:, :, 3].astype(np.float32) / np.float32(255.0) if subset.alpha_mask else None
    return PixelRow(to_model_input(pixels[:, :, :3]), None, alpha_mask, original_size, crop_box, item.bucket_reso)


def cached_latents_row(item: ImageItem, flipped: bool) -> PixelRow:
    cached = item.latents if item.latents is not None else load_latents_npz(item.latents_npz)
    if flipped and cached.latents_flipped is None:
        raise UserError(f"{item.latents_npz} has no latents_flipped for flip_aug; rebuild it (drop --skip_cache_check)")
    latents = cached.latents_flipped if flipped else cached.latents
    alpha_mask = cached.alpha_mask if item.subset.alpha_mask else None
    if flipped and alpha_mask is not None:
        alpha_mask = alpha_mask[:, ::-1].copy()
    target_size = (latents.shape[2] * 8, latents.shape[1] * 8)
    return PixelRow(None, latents, alpha_mask, cached.original_size, cached.crop_ltrb, target_size)


class Row(NamedTuple):
    item: ImageItem
    image: Optional[np.ndarray]
    latents: Optional[np.ndarray]
    alpha_mask: Optional[np.ndarray]
    caption: str
    flipped: bool
    text_encoder_outputs: Optional[Tuple[np.ndarray, ...]]
    original_hw: Tuple[int, int]
    crop_top_left: Tuple[int, int]
    target_hw: Tuple[int, int]


def stack_rows(rows: List[Row], prior_loss_weight: float) -> Batch:
    height, width = rows[0].target_hw
    alpha_masks = None
    if any(row.alpha_mask is not None for row in rows):
        # rows of subsets without alpha_mask count fully, as in sd-scripts
        ones = np.ones((height, width), np.float32)
        alpha_masks = np.stack([ones if row.alpha_mask is None else row.alpha_mask for row in rows])
    return Batch(
        images=stack_all_or_none([row.image for row in rows], "images"),
        latents=stack_all_or_none([row.latents for row in rows], "cached latents"),
        captions=[row.caption for row in rows],
        original_sizes_hw=np.array([row.original_hw for row in rows], np.int64),
        crop_top_lefts=np.array([row.crop_top_left for row in rows], np.int64),
        target_sizes_hw=np.array([row.target_hw for row in rows], np.int64),
        loss_weights=np.array([prior_loss_weight if row.item.is_reg else 1.0 for row in rows], np.float32),
        flipped=np.array([row.flipped for row in rows], bool),
        alpha_masks=alpha_masks,
        text_encoder_outputs=stack_outputs([row.text_encoder_outputs for row in rows]),
        custom_attributes=[row.item.subset.custom_attributes for row in rows],
        image_paths=[row.item.path for row in rows],
    )


def stack_all_or_none(arrays: List[Optional[np.ndarray]], what: str) -> Optional[np.ndarray]:
    present = [a is not None for a in arrays]
    if not any(present):
        return None
    if not all(present):
        raise RuntimeError(f"a batch mixes images with and without {what}; cache all images or none")
    return np.stack(arrays).astype(np.float32, copy=False)


def stack_outputs(outputs: List[Optional[Tuple[np.ndarray, ...]]]) -> Optional[Tuple[np.ndarray, ...]]:
    if all(o is None for o in outputs):
        return None
    if any(o is None for o in outputs):
        raise RuntimeError("a batch mixes images with and without cached text encoder outputs")
    return tuple(np.stack(parts) for parts in zip(*outputs))


# ---- building the group ----


def build_dataset_group(args: argparse.Namespace, sdxl: bool = True) -> DatasetGroup:
    """Everything that can be wrong with the data is a UserError from here, before any model loads.

    Reads `args.seed` (a random seed, kept in `group.seed`, when it is None), and, from the
    trainer's own arguments when present, `cache_text_encoder_outputs[_to_disk]` and
    `network_train_unet_only` to refuse what sd-scripts refuses with cached text encoder outputs.
    """
    refuse_unsupported_arguments(args)
    check_loader_arguments(args)
    configs = load_dataset_configs(args, sdxl)
    check_cache_compatibility(args, configs)

    scanned = [[(subset, scan_subset(subset, config)) for subset in config.subsets] for config in configs]
    all_items = [item for dataset in scanned for _, items in dataset for item in items]
    sizes = probe_images(sorted({item.path for item in all_items}), skip_bad=bool(getattr(args, "skip_bad_images", False)))

    seed = args.seed if getattr(args, "seed", None) is not None else random.randint(0, 2**31)
    datasets, validation_datasets = [], []
    for index, (config, subsets) in enumerate(zip(configs, scanned)):
        items, image_counts = [], {}
        held_out, held_out_counts = [], {}
        for subset, subset_items in subsets:
            readable = [item for item in subset_items if item.path in sizes]
            if not readable:
                raise UserError(f"no readable images left in {subset.source} after skipping unreadable ones")
            for item in readable:
                item.image_size = sizes[item.path]
            if subset.cache_info:
                write_info_cache(subset.image_dir, readable)
            if config.validation_split and not subset.is_reg:
                split_seed = seed if config.validation_seed is None else config.validation_seed
                readable, validation = split_for_validation(readable, config.validation_split, split_seed)
                if validation:
                    held_out += validation
                    held_out_counts[subset] = len(validation)
            image_counts[subset] = len(readable)
            items += readable
        log_dataset(index, config, image_counts)
        datasets.append(TrainDataset(index, config, items, image_counts))
        if held_out:
            logger.info("[Validation dataset %d] %d images held out of %s", len(validation_datasets), len(held_out),
                        config.source)
            validation_datasets.append(TrainDataset(len(validation_datasets), config, held_out, held_out_counts))

    def group_of(members):
        return DatasetGroup(
            members,
            seed,
            num_workers=getattr(args, "max_data_loader_n_workers", 8),
            persistent_workers=bool(getattr(args, "persistent_data_loader_workers", False)),
        )

    group = group_of(datasets)
    if validation_datasets:
        group.validation = group_of(validation_datasets)
    group._metadata = dataset_metadata(group, args, uses_config_file=getattr(args, "dataset_config", None) is not None)
    logger.info("%d train images with repeats, %d reg images with repeats", group.num_train_images, group.num_reg_images)
    return group


def split_for_validation(items: List[ImageItem], fraction: float, seed: int) -> Tuple[List[ImageItem], List[ImageItem]]:
    """(training, validation) items of one subset, as sd-scripts' split_train_val: the images shuffled by
    Python's random with `seed`, the first ceil(n * (1 - fraction)) for training. sd-scripts then takes
    round(n * fraction) from the end for validation, which can overlap the training part; here validation
    is exactly the rest, so a held-out image is never trained on."""
    shuffled = list(items)
    random.Random(seed).shuffle(shuffled)
    training_count = math.ceil(len(shuffled) * (1 - fraction))
    return shuffled[:training_count], shuffled[training_count:]


def check_loader_arguments(args: argparse.Namespace) -> None:
    if getattr(args, "vae_batch_size", 1) < 1:
        raise UserError(f"--vae_batch_size must be at least 1, got {args.vae_batch_size}")
    if getattr(args, "max_data_loader_n_workers", 0) < 0:
        raise UserError(f"--max_data_loader_n_workers must not be negative, got {args.max_data_loader_n_workers}")
    if getattr(args, "prior_loss_weight", 1.0) < 0:
        raise UserError(f"--prior_loss_weight must not be negative, got {args.prior_loss_weight}")


def check_cache_compatibility(args: argparse.Namespace, configs: List[DatasetConfig]) -> None:
    """sd-scripts' refusals: augmentations that change pixels per step cannot use cached latents;
    caption randomness cannot use cached text encoder outputs, which also freeze the text encoders."""
    subsets = [subset for config in configs for subset in config.subsets]
    if getattr(args, "cache_latents", False) or getattr(args, "cache_latents_to_disk", False):
        for subset in subsets:
            if subset.color_aug or subset.random_crop:
                raise UserError(f"color_aug and random_crop cannot be used with --cache_latents ({subset.source})")
    if getattr(args, "cache_text_encoder_outputs", False) or getattr(args, "cache_text_encoder_outputs_to_disk", False):
        if not getattr(args, "network_train_unet_only", False):
            raise UserError("--cache_text_encoder_outputs requires --network_train_unet_only (cached text encoders cannot train)")
        for subset in subsets:
            if subset.captions.is_random:
                raise UserError(
                    "shuffle_caption, caption_dropout_rate, caption_dropout_every_n_epochs, caption_tag_dropout_rate, "
                    f"token_warmup_step and enable_wildcard cannot be used with --cache_text_encoder_outputs ({subset.source})"
                )


# ---- scanning folders and metadata files ----


def scan_subset(subset: SubsetConfig, config: DatasetConfig) -> List[ImageItem]:
    interpolation = subset.resize_interpolation or config.resize_interpolation
    if subset.kind == DREAMBOOTH:
        return scan_dreambooth_subset(subset, interpolation)
    return scan_finetune_subset(subset, interpolation)


def scan_dreambooth_subset(subset: SubsetConfig, interpolation: Optional[str]) -> List[ImageItem]:
    image_dir = subset.image_dir
    if not os.path.isdir(image_dir):
        raise UserError(f"image_dir not found: {image_dir} ({subset.source})")
    paths = list_image_files(image_dir)
    if not paths:
        raise UserError(f"no images ({' '.join(IMAGE_EXTENSIONS)}) in {image_dir} ({subset.source})")
    warn_orphan_captions(image_dir, paths, subset.caption_extension)

    cached = read_info_cache(image_dir) if subset.cache_info else {}
    items, missing = [], 0
    for path in paths:
        if path in cached:
            caption = cached[path].get("caption") or None
        else:
            caption = read_caption_file(path, subset.caption_extension, subset.captions.enable_wildcard)
        if caption is None:
            missing += 1
            caption = subset.class_tokens or ""
        items.append(ImageItem(path, caption, subset, subset.is_reg, subset.num_repeats, interpolation))
    if missing:
        fallback = f"class tokens {subset.class_tokens!r}" if subset.class_tokens else "an empty caption"
        logger.warning("no %s caption file for %d of %d images in %s: using %s", subset.caption_extension, missing, len(paths), image_dir, fallback)
    return items


def warn_orphan_captions(image_dir: str, image_paths: List[str], caption_extension: str) -> None:
    if not caption_extension:
        return
    stems = {os.path.splitext(path)[0] for path in image_paths}
    orphans = sorted(
        name
        for name in os.listdir(image_dir)
        if name.endswith(caption_extension) and os.path.join(image_dir, name[: -len(caption_extension)]) not in stems
    )
    if orphans:
        logger.warning("%d caption files in %s have no image, e.g. %s", len(orphans), image_dir, ", ".join(orphans[:3]))


def scan_finetune_subset(subset: SubsetConfig, interpolation: Optional[str]) -> List[ImageItem]:
    metadata = read_metadata_file(subset.metadata_file, subset.source)
    items = []
    for key, entry in metadata.items():
        if not isinstance(entry, dict):
            raise UserError(f"entry {key!r} of {subset.metadata_file} must be an object with caption/tags")
        tags = entry.get("tags")
        caption = caption_from_metadata(entry.get("caption"), tags, subset.captions)
        if tags is not None and subset.captions.enable_wildcard:
            tags = tags.replace("\n", subset.captions.caption_separator)
        path = metadata_image_path(key, subset)
        items.append(ImageItem(path, caption, subset, False, subset.num_repeats, interpolation, tags=tags or None))
    return items


def read_metadata_file(path: str, source: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"metadata_file not found: {path} ({source})")
    with open(path, "rt", encoding="utf-8") as f:
        text = f.read()
    try:
        if path.endswith(".jsonl"):
            lines = [json.loads(line) for line in text.splitlines() if line.strip()]
            metadata = {line["image_path"]: line for line in lines}
        else:
            metadata = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}") from None
    except (KeyError, TypeError):
        raise UserError(f"{path}: every JSONL line needs an image_path") from None
    if not isinstance(metadata, dict) or not metadata:
        raise UserError(f"no image entries in metadata_file {path} ({source})")
    return metadata


def metadata_image_path(key: str, subset: SubsetConfig) -> str:
    """A metadata key is an image path, absolute or relative to image_dir. sd-scripts'
    merge_captions_to_metadata writes bare stems by default, so those are matched to an image file."""
    if os.path.isabs(key):
        path = key
    elif subset.image_dir is None:
        raise UserError(f"image_dir is required in {subset.source}: {subset.metadata_file} has relative paths like {key!r}")
    else:
        path = os.path.join(subset.image_dir, key)
    if not os.path.isfile(path):
        for extension in IMAGE_EXTENSIONS:
            for candidate in (path + extension, path + extension.upper()):
                if os.path.isfile(candidate):
                    return candidate
    return path


def read_info_cache(image_dir: str) -> dict:
    path = os.path.join(image_dir, IMAGE_INFO_CACHE_FILE)
    if not os.path.isfile(path):
        logger.info("no %s yet in %s: it is written after this scan (cache_info)", IMAGE_INFO_CACHE_FILE, image_dir)
        return {}
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not valid JSON ({error}); delete it to rebuild it") from None


def write_info_cache(image_dir: str, items: List[ImageItem]) -> None:
    """sd-scripts' cache_info file: {image path: {caption, resolution: [w, h]}}, written once."""
    path = os.path.join(image_dir, IMAGE_INFO_CACHE_FILE)
    if os.path.isfile(path):
        return
    content = {item.path: {"caption": item.caption, "resolution": list(item.image_size)} for item in items}
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump(content, f, ensure_ascii=False, indent=2)
    os.replace(temporary, path)


def probe_images(paths: List[str], skip_bad: bool) -> Dict[str, Tuple[int, int]]:
    """Decode every image once, in threads; return the sizes of the readable ones.

    Unreadable images stop the run with a one-line error naming the first, unless `skip_bad`.
    """

    def probe(path: str):
        if not os.path.isfile(path):
            return path, None, "file not found"
        try:
            return path, probe_image(path), None
        except ImageReadError as error:
            return path, None, str(error)

    sizes, bad = {}, {}
    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as executor:
        for path, size, problem in tqdm(executor.map(probe, paths), total=len(paths), desc="checking images", smoothing=0):
            if problem is None:
                sizes[path] = size
            else:
                bad[path] = problem
    if bad and not skip_bad:
        path, problem = next(iter(bad.items()))
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise UserError(f"cannot read image {path}: {problem}{more}; fix or remove it, or pass --skip_bad_images")
    if bad:
        logger.warning("skipping %d unreadable images (--skip_bad_images):", len(bad))
        for path, problem in bad.items():
            logger.warning("  %s: %s", path, problem)
    return sizes


def log_dataset(index: int, config: DatasetConfig, image_counts: Dict[SubsetConfig, int]) -> None:
    lines = [f"[Dataset {index}] {config.source}", f"  batch_size: {config.batch_size}", f"  resolution: {config.resolution}"]
    lines.append(f"  enable_bucket: {config.enable_bucket}")
    if config.enable_bucket:
        lines += [
            f"  min_bucket_reso: {config.min_bucket_reso}",
            f"  max_bucket_reso: {config.max_bucket_reso}",
            f"  bucket_reso_steps: {config.bucket_reso_steps}",
            f"  bucket_no_upscale: {config.bucket_no_upscale}",
        ]
    for j, (subset, count) in enumerate(image_counts.items()):
        where = subset.image_dir if subset.kind == DREAMBOOTH else subset.metadata_file
        lines.append(f"  [Subset {j}] {where}: {count} images x {subset.num_repeats} repeats" + (" (reg)" if subset.is_reg else ""))
    for line in lines:
        logger.info(line)


# ---- metadata, as sd-scripts' train_network.py writes it ----


def dataset_metadata(group: DatasetGroup, args: argparse.Namespace, uses_config_file: bool) -> dict:
    metadata = {
        "ss_num_train_images": group.num_train_images,
        "ss_num_validation_images": group.validation.num_train_images if group.validation else 0,
        "ss_num_reg_images": group.num_reg_images,
        "ss_num_batches_per_epoch": group.num_batches_per_epoch,
    }
    if uses_config_file:
        metadata.update(config_file_metadata(group))
    else:
        metadata.update(command_line_metadata(group.datasets[0], args))
    return metadata


def config_file_metadata(group: DatasetGroup) -> dict:
    datasets, tag_frequency, dataset_dirs = [], {}, {}
    for dataset in group.datasets:
        config = dataset.config
        is_dreambooth = config.kind == DREAMBOOTH
        subsets = []
        for subset, count in dataset.image_counts.items():
            captions = subset.captions
            entry = {
                "img_count": count,
                "num_repeats": subset.num_repeats,
                "color_aug": subset.color_aug,
                "flip_aug": subset.flip_aug,
                "random_crop": subset.random_crop,
                "shuffle_caption": captions.shuffle_caption,
                "keep_tokens": captions.keep_tokens,
                "keep_tokens_separator": captions.keep_tokens_separator,
                "secondary_separator": captions.secondary_separator,
                "enable_wildcard": captions.enable_wildcard,
                "caption_prefix": captions.caption_prefix,
                "caption_suffix": captions.caption_suffix,
                "resize_interpolation": subset.resize_interpolation,
            }
            dir_name = None
            if subset.image_dir:
                entry["image_dir"] = dir_name = os.path.basename(subset.image_dir)
            if is_dreambooth:
                entry["class_tokens"] = subset.class_tokens
                entry["is_reg"] = subset.is_reg
                if subset.is_reg:
                    dir_name = None  # regularization folders are not listed in ss_dataset_dirs
            else:
                entry["metadata_file"] = dir_name = os.path.basename(subset.metadata_file)
            subsets.append(entry)

            if dir_name is not None:
                unique, n = dir_name, 2
                while unique in dataset_dirs:
                    unique, n = f"{dir_name} ({n})", n + 1
                dataset_dirs[unique] = {"n_repeats": subset.num_repeats, "img_count": count}

        datasets.append(
            {
                "is_dreambooth": is_dreambooth,
                "batch_size_per_device": config.batch_size,
                "num_train_images": dataset.num_train_images,
                "num_reg_images": dataset.num_reg_images,
                "resolution": config.resolution,
                "enable_bucket": config.enable_bucket,
                "min_bucket_reso": config.min_bucket_reso,
                "max_bucket_reso": config.max_bucket_reso,
                "tag_frequency": dataset.tag_frequency,
                "bucket_info": dataset.bucket_info,
                "resize_interpolation": config.resize_interpolation,
                "subsets": subsets,
            }
        )
        for dir_name, frequency in dataset.tag_frequency.items():
            tag_frequency.setdefault(dir_name, frequency)  # a folder used by several datasets counts once
    return {
        "ss_datasets": json.dumps(datasets),
        "ss_tag_frequency": json.dumps(tag_frequency),
        "ss_dataset_dirs": json.dumps(dataset_dirs),
    }


def command_line_metadata(dataset: TrainDataset, args: argparse.Namespace) -> dict:
    config = dataset.config
    dataset_dirs, reg_dataset_dirs = {}, {}
    for subset, count in dataset.image_counts.items():
        if subset.kind == DREAMBOOTH:
            target, name = (reg_dataset_dirs if subset.is_reg else dataset_dirs), os.path.basename(subset.image_dir)
        else:
            target, name = dataset_dirs, os.path.basename(subset.metadata_file)
        target[name] = {"n_repeats": subset.num_repeats, "img_count": count}
    return {
        "ss_batch_size_per_device": args.train_batch_size,
        "ss_resolution": parse_resolution(args.resolution) if args.resolution is not None else None,
        "ss_color_aug": bool(args.color_aug),
        "ss_flip_aug": bool(args.flip_aug),
        "ss_random_crop": bool(args.random_crop),
        "ss_shuffle_caption": bool(args.shuffle_caption),
        "ss_enable_bucket": config.enable_bucket,
        "ss_bucket_no_upscale": config.bucket_no_upscale,
        "ss_min_bucket_reso": config.min_bucket_reso,
        "ss_max_bucket_reso": config.max_bucket_reso,
        "ss_keep_tokens": args.keep_tokens,
        "ss_dataset_dirs": json.dumps(dataset_dirs),
        "ss_reg_dataset_dirs": json.dumps(reg_dataset_dirs),
        "ss_tag_frequency": json.dumps(dataset.tag_frequency),
        "ss_bucket_info": json.dumps(dataset.bucket_info),
    }
