"""Command-line arguments of the dataset, with sd-scripts' names, types and defaults.

- `add_dataset_arguments(parser)`: registers every dataset-related sd-scripts argument (from its
  add_dataset_arguments, add_training_arguments, config_util and train_network) plus our own
  `--skip_bad_images`. Training arguments that the dataset merely reads (`--seed`,
  `--network_train_unet_only`, `--cache_text_encoder_outputs[_to_disk]`) belong to the trainer.
- `refuse_unsupported_arguments(args)`: raises UserError naming the first sd-scripts dataset
  argument that is set but not supported here (REFUSED_ARGUMENTS says why for each).
- `parse_resolution(text)`: '512' or '768,1024' -> (width, height), as sd-scripts.

The SDXL constraint on bucket_reso_steps (a multiple of 32; the default 64 stays) is checked when
the dataset is built, with `build_dataset_group(args, sdxl=True)`, not here.
"""

import argparse
from pathlib import Path
from typing import Tuple

from library.errors import UserError
from library.images import RESIZE_INTERPOLATIONS

# argument -> (is it in use?, why it is refused)
REFUSED_ARGUMENTS = {
    "face_crop_aug_range": (lambda v: v is not None, "face-centred crop augmentation is not implemented"),
    "debug_dataset": (bool, "the interactive dataset viewer is not implemented"),
    "dataset_class": (lambda v: v is not None, "custom dataset classes are not supported"),
}


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument

    add("--dataset_config", type=Path, default=None, help="dataset config file (.toml or .json), as sd-scripts")
    add("--train_data_dir", type=str, default=None, help="folder of `<repeats>_<class tokens>` image folders")
    add("--reg_data_dir", type=str, default=None, help="folder of regularization image folders")
    add("--in_json", type=str, default=None, help="fine-tuning metadata json for --train_data_dir")
    add("--dataset_repeats", type=int, default=1, help="repeats of a fine-tuning dataset")
    add("--cache_info", action="store_true", help="cache captions and image sizes in metadata_cache.json (DreamBooth)")

    add("--train_batch_size", type=int, default=1, help="batch size for training")
    add("--resolution", type=str, default=None, help="training resolution: 'size' or 'width,height'")
    add("--enable_bucket", action="store_true", help="enable aspect-ratio buckets")
    add("--min_bucket_reso", type=int, default=256, help="minimum bucket side, divisible by bucket_reso_steps")
    add("--max_bucket_reso", type=int, default=1024, help="maximum bucket side, divisible by bucket_reso_steps")
    add("--bucket_reso_steps", type=int, default=64, help="bucket side step (SDXL: a multiple of 32)")
    add("--bucket_no_upscale", action="store_true", help="make buckets from image sizes without upscaling")
    add(
        "--resize_interpolation",
        type=str,
        default=None,
        choices=[name for name in RESIZE_INTERPOLATIONS if name != "box"],
        help="resize interpolation (default: area to shrink, lanczos to enlarge)",
    )

    add("--caption_extension", type=str, default=".caption", help="extension of caption files")
    add("--caption_extention", type=str, default=None, help="deprecated misspelling of --caption_extension")
    add("--shuffle_caption", action="store_true", help="shuffle the separated tags of captions")
    add("--caption_separator", type=str, default=",", help="separator of caption tags")
    add("--keep_tokens", type=int, default=0, help="keep the first N tags in place when shuffling")
    add("--keep_tokens_separator", type=str, default="", help="tags before this separator stay fixed")
    add("--secondary_separator", type=str, default=None, help="joins tags kept together; replaced by caption_separator")
    add("--enable_wildcard", action="store_true", help="enable {a|b} wildcards and multi-line captions")
    add("--caption_prefix", type=str, default=None, help="text put before each caption")
    add("--caption_suffix", type=str, default=None, help="text put after each caption")
    add("--caption_dropout_rate", type=float, default=0.0, help="probability of dropping the whole caption")
    add("--caption_dropout_every_n_epochs", type=int, default=0, help="drop all captions every N epochs")
    add("--caption_tag_dropout_rate", type=float, default=0.0, help="probability of dropping each tag")
    add("--token_warmup_min", type=int, default=1, help="number of tags at step 0 of token warmup")
    add("--token_warmup_step", type=float, default=0, help="step (or fraction of max_train_steps) of full tags")

    add("--color_aug", action="store_true", help="weak colour augmentation")
    add("--flip_aug", action="store_true", help="random horizontal flips")
    add("--random_crop", action="store_true", help="random instead of centre crop")
    add("--face_crop_aug_range", type=str, default=None, help="not supported here")
    add("--alpha_mask", action="store_true", help="use the alpha channel as loss mask")
    add("--debug_dataset", action="store_true", help="not supported here")
    add("--dataset_class", type=str, default=None, help="not supported here")

    add("--cache_latents", action="store_true", help="cache VAE latents in memory")
    add("--cache_latents_to_disk", action="store_true", help="cache VAE latents as .npz beside the images")
    add("--vae_batch_size", type=int, default=1, help="batch size when caching latents")
    add("--skip_cache_check", action="store_true", help="trust existing cache files without checking their content")

    add("--max_data_loader_n_workers", type=int, default=8, help="background loading threads (0: load inline)")
    add("--persistent_data_loader_workers", action="store_true", help="keep loading threads between epochs")
    add("--prior_loss_weight", type=float, default=1.0, help="loss weight of regularization images")
    add("--max_token_length", type=int, default=None, choices=[None, 150, 225], help="text encoder token length")
    add("--validation_split", type=float, default=0.0, help="fraction of each dataset held out for validation (default 0: none)")
    add("--validation_seed", type=int, default=None, help="seed of the validation split")
    add("--skip_bad_images", action="store_true", help="skip unreadable images (listed) instead of stopping")


def refuse_unsupported_arguments(args: argparse.Namespace) -> None:
    for name, (in_use, reason) in REFUSED_ARGUMENTS.items():
        if in_use(getattr(args, name, None)):
            raise UserError(f"--{name} is not supported: {reason}")


def parse_resolution(text) -> Tuple[int, int]:
    """'512' -> (512, 512); '768,1024' -> (768, 1024). A parsed pair passes through."""
    if isinstance(text, (tuple, list)):
        values = list(text)
    else:
        try:
            values = [int(part) for part in str(text).split(",")]
        except ValueError:
            raise UserError(f"--resolution must be 'size' or 'width,height', got {text!r}") from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or any(not isinstance(v, int) or v <= 0 for v in values):
        raise UserError(f"--resolution must be 'size' or 'width,height' with positive integers, got {text!r}")
    return values[0], values[1]
