"""The dataset description: sd-scripts' --dataset_config file, or its command-line fallback.

`load_dataset_configs(args, sdxl=True) -> list[DatasetConfig]` reads `--dataset_config` (TOML or
JSON with `[general]`, `[[datasets]]`, `[[datasets.subsets]]`), or builds the same structure from
`--train_data_dir`/`--reg_data_dir` (`<repeats>_<class tokens>` folders) or `--in_json`, and
returns fully resolved, validated settings. Nothing here touches images.

Precedence is sd-scripts': a subset value comes from the subset table, then its dataset, then
`[general]`, then the command line (its defaults included, so `args` must come from a parser set up
by add_dataset_arguments); dataset values skip the subset level.

Every option sd-scripts accepts at each level is accepted here or refused by name; unknown keys,
keys at the wrong level and wrong types are errors naming the key, the table and the file, like
sd-scripts' schema (whose messages are less specific). Malformed files report line and column.
"""

import argparse
import json
import logging
import os
import tomllib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import toml

from library.captions import CaptionOptions
from library.dataset_args import parse_resolution
from library.errors import UserError
from library.images import RESIZE_INTERPOLATIONS

logger = logging.getLogger(__name__)

DREAMBOOTH = "dreambooth"
FINETUNE = "finetune"


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: one object per subset table
class SubsetConfig:
    kind: str  # DREAMBOOTH or FINETUNE
    source: str  # where it was defined, for messages
    image_dir: Optional[str]
    metadata_file: Optional[str]
    is_reg: bool
    class_tokens: Optional[str]
    caption_extension: str
    cache_info: bool
    alpha_mask: bool
    num_repeats: int
    color_aug: bool
    flip_aug: bool
    random_crop: bool
    resize_interpolation: Optional[str]
    custom_attributes: Dict[str, Any]
    captions: CaptionOptions


@dataclass(frozen=True)
class DatasetConfig:
    kind: str
    source: str
    batch_size: int
    resolution: Tuple[int, int]  # (width, height)
    enable_bucket: bool
    min_bucket_reso: Optional[int]  # None without buckets, as sd-scripts records it
    max_bucket_reso: Optional[int]
    bucket_reso_steps: Optional[int]
    bucket_no_upscale: bool
    resize_interpolation: Optional[str]
    prior_loss_weight: float
    subsets: Tuple[SubsetConfig, ...] = field(default_factory=tuple)
    validation_split: float = 0.0  # fraction of each image_dir subset held out for validation (reg: none)
    validation_seed: Optional[int] = None  # seed of that split; None: the training --seed


# ---- schema: the option types and where each may appear (sd-scripts' ConfigSanitizer) ----

_BOOL, _INT, _NUMBER, _STR, _RESOLUTION, _NUMBER_PAIR, _TABLE = (
    "a boolean (true/false)",
    "an integer",
    "a number",
    "a string",
    "an integer or [width, height]",
    "a pair of numbers",
    "a table",
)

DATASET_OPTIONS = {
    "batch_size": _INT,
    "bucket_no_upscale": _BOOL,
    "bucket_reso_steps": _INT,
    "enable_bucket": _BOOL,
    "max_bucket_reso": _INT,
    "min_bucket_reso": _INT,
    "validation_seed": _INT,
    "validation_split": _NUMBER,
    "resolution": _RESOLUTION,
    "network_multiplier": _NUMBER,
    "resize_interpolation": _STR,
}
SUBSET_OPTIONS = {
    "color_aug": _BOOL,
    "face_crop_aug_range": _NUMBER_PAIR,
    "flip_aug": _BOOL,
    "num_repeats": _INT,
    "random_crop": _BOOL,
    "shuffle_caption": _BOOL,
    "keep_tokens": _INT,
    "keep_tokens_separator": _STR,
    "secondary_separator": _STR,
    "caption_separator": _STR,
    "enable_wildcard": _BOOL,
    "token_warmup_min": _INT,
    "token_warmup_step": _NUMBER,
    "caption_prefix": _STR,
    "caption_suffix": _STR,
    "custom_attributes": _TABLE,
    "resize_interpolation": _STR,
    "caption_dropout_every_n_epochs": _INT,
    "caption_dropout_rate": _NUMBER,
    "caption_tag_dropout_rate": _NUMBER,
}
DREAMBOOTH_OPTIONS = {"caption_extension": _STR, "class_tokens": _STR, "cache_info": _BOOL}
DREAMBOOTH_SUBSET_ONLY = {"image_dir": _STR, "is_reg": _BOOL, "alpha_mask": _BOOL}
FINETUNE_SUBSET_ONLY = {"metadata_file": _STR, "image_dir": _STR, "alpha_mask": _BOOL}

GENERAL_SCHEMA = {**DATASET_OPTIONS, **SUBSET_OPTIONS, **DREAMBOOTH_OPTIONS}
DATASET_SCHEMA = {DREAMBOOTH: GENERAL_SCHEMA, FINETUNE: {**DATASET_OPTIONS, **SUBSET_OPTIONS}}
SUBSET_SCHEMA = {
    DREAMBOOTH: {**SUBSET_OPTIONS, **DREAMBOOTH_OPTIONS, **DREAMBOOTH_SUBSET_ONLY},
    FINETUNE: {**SUBSET_OPTIONS, **FINETUNE_SUBSET_ONLY},
}
REFUSED_OPTIONS = {
    "conditioning_data_dir": "ControlNet-style subsets are not supported",
    "face_crop_aug_range": "face-centred crop augmentation is not implemented",
}

# command-line names that differ from the config names
CLI_TO_CONFIG_NAME = {"train_batch_size": "batch_size", "dataset_repeats": "num_repeats"}

def load_dataset_configs(args: argparse.Namespace, sdxl: bool = True) -> List[DatasetConfig]:
    cli = command_line_values(args)
    if getattr(args, "dataset_config", None) is None:
        config, where = config_from_command_line(args)
        subset_wheres = [[command_line_subset_name(subset) for subset in config["datasets"][0]["subsets"]]]
        wheres = [where]
    else:
        path = os.fspath(args.dataset_config)
        ignored = [f"--{name}" for name in ("train_data_dir", "reg_data_dir", "in_json") if getattr(args, name, None)]
        if ignored:
            logger.warning("ignoring %s because --dataset_config is given", ", ".join(ignored))
        config = load_config_file(path)
        origin = os.path.basename(path)
        validate_config(config, origin)
        wheres = [f"[[datasets]] #{j + 1} in {origin}" for j in range(len(config["datasets"]))]
        subset_wheres = [
            [f"[[datasets.subsets]] #{i + 1} of [[datasets]] #{j + 1} in {origin}" for i in range(len(dataset["subsets"]))]
            for j, dataset in enumerate(config["datasets"])
        ]
    general = config.get("general", {})
    return [
        resolve_dataset(table, general, cli, sdxl, where, subset_where)
        for table, where, subset_where in zip(config["datasets"], wheres, subset_wheres)
    ]


def command_line_values(args: argparse.Namespace) -> Dict[str, Any]:
    values = {CLI_TO_CONFIG_NAME.get(name, name): value for name, value in vars(args).items()}
    if getattr(args, "caption_extention", None) is not None:
        values["caption_extension"] = args.caption_extention
    if values.get("resolution") is not None:
        values["resolution"] = parse_resolution(values["resolution"])
    return values


# ---- reading the file ----


def load_config_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"dataset config file not found: {path}")
    name = os.path.basename(path)
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{name} is not UTF-8 text; re-save it as UTF-8") from None

    if name.lower().endswith(".json"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise UserError(f"{name}: invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}") from None
    if name.lower().endswith(".toml"):
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            strict_error = error
        # sd-scripts parses with the older `toml` package; anything it accepts must load here too
        try:
            return toml.loads(text)
        except toml.TomlDecodeError:
            raise UserError(f"{name}: invalid TOML: {strict_error}") from None
    raise UserError(f"dataset config must be a .toml or .json file: {path}")


def validate_config(config: dict, origin: str) -> None:
    """Check table structure, option names, option levels and value types."""
    if not isinstance(config, dict):
        raise UserError(f"{origin}: the top level must be a table with [general] and [[datasets]]")
    for key in config:
        if key not in ("general", "datasets"):
            raise UserError(f'unknown top-level key "{key}" in {origin} (expected [general] and [[datasets]])')
    general = config.get("general", {})
    if not isinstance(general, dict):
        raise UserError(f"[general] in {origin} must be a table")
    check_table(general, GENERAL_SCHEMA, "[general]", origin)

    datasets = config.get("datasets")
    if not isinstance(datasets, list) or not datasets or not all(isinstance(d, dict) for d in datasets):
        raise UserError(f"{origin} must define at least one [[datasets]] table")
    for j, dataset in enumerate(datasets):
        where = f"[[datasets]] #{j + 1}"
        subsets = dataset.get("subsets")
        if not isinstance(subsets, list) or not subsets or not all(isinstance(s, dict) for s in subsets):
            raise UserError(f"{where} in {origin} has no [[datasets.subsets]] table")
        kind = dataset_kind(subsets, f"{where} in {origin}")
        check_table({k: v for k, v in dataset.items() if k != "subsets"}, DATASET_SCHEMA[kind], where, origin)
        for i, subset in enumerate(subsets):
            subset_where = f"[[datasets.subsets]] #{i + 1} of {where}"
            check_table(subset, SUBSET_SCHEMA[kind], subset_where, origin)
            required = "image_dir" if kind == DREAMBOOTH else "metadata_file"
            if required not in subset:
                raise UserError(f'"{required}" is required in {subset_where} in {origin}')


def dataset_kind(subsets: List[dict], where: str) -> str:
    with_metadata = ["metadata_file" in subset for subset in subsets]
    if all(with_metadata):
        return FINETUNE
    if not any(with_metadata):
        return DREAMBOOTH
    raise UserError(
        f"{where} mixes DreamBooth subsets (image_dir) and fine-tuning subsets (metadata_file); "
        "put them in separate [[datasets]]"
    )


def check_table(table: dict, schema: Dict[str, str], where: str, origin: str) -> None:
    for key, value in table.items():
        if key in REFUSED_OPTIONS:
            raise UserError(f'"{key}" in {where} in {origin} is not supported: {REFUSED_OPTIONS[key]}')
        if key not in schema:
            raise UserError(f'"{key}" is not allowed in {where} in {origin}{misplaced_hint(key)}')
        if value is not None and not has_type(value, schema[key]):
            raise UserError(f'"{key}" in {where} in {origin} must be {schema[key]}, got {value!r}')


def misplaced_hint(key: str) -> str:
    if key in DREAMBOOTH_SUBSET_ONLY or key in FINETUNE_SUBSET_ONLY:
        return " (it belongs in [[datasets.subsets]])"
    if key in DATASET_OPTIONS:
        return " (it is a dataset option: put it in [[datasets]] or [general])"
    if key in DREAMBOOTH_OPTIONS:
        return " (it only applies to DreamBooth datasets, not to fine-tuning ones with metadata_file)"
    if key == "prior_loss_weight":
        return " (it is a command-line option: --prior_loss_weight)"
    return " (unknown option; check its spelling)"


def has_type(value, expected: str) -> bool:
    is_int = isinstance(value, int) and not isinstance(value, bool)
    is_number = is_int or isinstance(value, float)
    if expected == _BOOL:
        return isinstance(value, bool)
    if expected == _INT:
        return is_int
    if expected == _NUMBER:
        return is_number
    if expected == _STR:
        return isinstance(value, str)
    if expected == _TABLE:
        return isinstance(value, dict)
    if expected == _RESOLUTION:
        return is_int or (isinstance(value, list) and len(value) == 2 and all(has_type(v, _INT) for v in value))
    if expected == _NUMBER_PAIR:
        return isinstance(value, list) and len(value) == 2 and all(has_type(v, _NUMBER) for v in value)
    raise ValueError(expected)


# ---- the command-line fallback: the same structure sd-scripts builds ----


def config_from_command_line(args: argparse.Namespace) -> Tuple[dict, str]:
    """The config sd-scripts builds from the command line, and how to name its dataset."""
    if getattr(args, "in_json", None) is not None:
        subset = {"metadata_file": args.in_json}
        if getattr(args, "train_data_dir", None) is not None:
            subset["image_dir"] = args.train_data_dir
        return {"datasets": [{"subsets": [subset]}]}, "the --in_json dataset"

    if getattr(args, "train_data_dir", None) is None:
        raise UserError("no training data: pass --dataset_config, --train_data_dir or --in_json")
    subsets = repeat_folder_subsets(args.train_data_dir, "--train_data_dir", is_reg=False)
    if not subsets:
        raise UserError(
            f"--train_data_dir {args.train_data_dir} has no `<repeats>_<class tokens>` folder "
            "(it must be the parent of folders like `10_sks dog`, not the image folder itself)"
        )
    if getattr(args, "reg_data_dir", None) is not None:
        subsets += repeat_folder_subsets(args.reg_data_dir, "--reg_data_dir", is_reg=True)
    return {"datasets": [{"subsets": subsets}]}, "the --train_data_dir dataset"


def command_line_subset_name(subset: dict) -> str:
    if "metadata_file" in subset:
        return f"metadata file {subset['metadata_file']}"
    return f"folder {subset['image_dir']}"


def repeat_folder_subsets(base_dir: str, option: str, is_reg: bool) -> List[dict]:
    """One subset per `<repeats>_<class tokens>` folder, like sd-scripts (folders sorted by name)."""
    if not os.path.isdir(base_dir):
        raise UserError(f"{option} folder not found: {base_dir}")
    subsets = []
    for name in sorted(os.listdir(base_dir)):
        path = os.path.join(base_dir, name)
        if not os.path.isdir(path):
            continue
        repeats, _, class_tokens = name.partition("_")
        try:
            num_repeats = int(repeats)
        except ValueError:
            logger.warning("ignoring folder without a repeat count (`<repeats>_<class tokens>`): %s", path)
            continue
        if num_repeats < 1:
            logger.warning("ignoring folder with %d repeats: %s", num_repeats, path)
            continue
        subsets.append({"image_dir": path, "num_repeats": num_repeats, "is_reg": is_reg, "class_tokens": class_tokens})
    return subsets


# ---- precedence and semantic checks ----


def resolve_dataset(table: dict, general: dict, cli: dict, sdxl: bool, where: str, subset_wheres: List[str]) -> DatasetConfig:
    subset_tables = table["subsets"]
    kind = dataset_kind(subset_tables, where)

    def lookup(key: str, *tables: dict):
        for candidate in (*tables, table, general, cli):
            value = candidate.get(key)
            if value is not None:
                return value
        return None

    resolution = lookup("resolution")
    if resolution is None:
        raise UserError(f"resolution is required for {where}: set `resolution` in the dataset config or pass --resolution")
    resolution = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)

    enable_bucket = bool(lookup("enable_bucket"))
    steps = lookup("bucket_reso_steps")
    min_reso, max_reso = lookup("min_bucket_reso"), lookup("max_bucket_reso")
    check_dataset_values(where, lookup("batch_size"), resolution, enable_bucket, steps, min_reso, max_reso, sdxl)
    if enable_bucket:
        min_reso, max_reso = adjust_bucket_limits(where, resolution, min_reso, max_reso, steps)
    check_option_values(where, lookup)
    check_validation_split(where, kind, lookup("validation_split"))

    subsets = [
        resolve_subset(kind, subset_table, subset_where, lookup)
        for subset_table, subset_where in zip(subset_tables, subset_wheres)
    ]
    return DatasetConfig(
        kind=kind,
        source=where,
        batch_size=lookup("batch_size"),
        resolution=resolution,
        enable_bucket=enable_bucket,
        min_bucket_reso=min_reso if enable_bucket else None,
        max_bucket_reso=max_reso if enable_bucket else None,
        bucket_reso_steps=steps if enable_bucket else None,
        bucket_no_upscale=bool(lookup("bucket_no_upscale")) if enable_bucket else False,
        resize_interpolation=lookup("resize_interpolation"),
        prior_loss_weight=float(lookup("prior_loss_weight")),
        subsets=drop_duplicate_subsets(subsets),
        validation_split=float(lookup("validation_split") or 0.0),
        validation_seed=lookup("validation_seed"),
    )


def drop_duplicate_subsets(subsets: List[SubsetConfig]) -> Tuple[SubsetConfig, ...]:
    """Within a dataset, a second subset of the same folder (or metadata file) is ignored, as sd-scripts."""
    kept, seen = [], set()
    for subset in subsets:
        identity = subset.metadata_file if subset.kind == FINETUNE else subset.image_dir
        if identity in seen:
            logger.warning("ignoring duplicated subset %s (%s): the first one is used", subset.source, identity)
            continue
        seen.add(identity)
        kept.append(subset)
    return tuple(kept)


def resolve_subset(kind: str, table: dict, where: str, dataset_lookup) -> SubsetConfig:
    def lookup(key: str):
        return dataset_lookup(key, table)

    check_option_values(where, lookup)
    num_repeats = lookup("num_repeats")
    if num_repeats < 1:
        raise UserError(f"num_repeats must be at least 1 in {where}, got {num_repeats}")

    caption_extension = lookup("caption_extension")
    if caption_extension and not caption_extension.startswith("."):
        caption_extension = "." + caption_extension

    captions = CaptionOptions(
        caption_prefix=lookup("caption_prefix"),
        caption_suffix=lookup("caption_suffix"),
        shuffle_caption=lookup("shuffle_caption"),
        keep_tokens=lookup("keep_tokens"),
        keep_tokens_separator=lookup("keep_tokens_separator"),
        caption_separator=lookup("caption_separator"),
        secondary_separator=lookup("secondary_separator"),
        enable_wildcard=lookup("enable_wildcard"),
        caption_dropout_rate=float(lookup("caption_dropout_rate")),
        caption_dropout_every_n_epochs=lookup("caption_dropout_every_n_epochs"),
        caption_tag_dropout_rate=float(lookup("caption_tag_dropout_rate")),
        token_warmup_min=lookup("token_warmup_min"),
        token_warmup_step=lookup("token_warmup_step"),
    )
    # image_dir and metadata_file are subset-only: never inherited from the command line
    return SubsetConfig(
        kind=kind,
        source=where,
        image_dir=table.get("image_dir"),
        metadata_file=table.get("metadata_file"),
        is_reg=bool(table.get("is_reg", False)) if kind == DREAMBOOTH else False,
        class_tokens=lookup("class_tokens") if kind == DREAMBOOTH else None,
        caption_extension=caption_extension,
        cache_info=bool(lookup("cache_info")) if kind == DREAMBOOTH else False,
        alpha_mask=lookup("alpha_mask"),
        num_repeats=num_repeats,
        color_aug=lookup("color_aug"),
        flip_aug=lookup("flip_aug"),
        random_crop=lookup("random_crop"),
        resize_interpolation=lookup("resize_interpolation"),
        custom_attributes=dict(lookup("custom_attributes") or {}),
        captions=captions,
    )


def check_dataset_values(where, batch_size, resolution, enable_bucket, steps, min_reso, max_reso, sdxl: bool) -> None:
    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1 in {where}, got {batch_size}")
    if min(resolution) <= 0:
        raise UserError(f"resolution must be positive in {where}, got {resolution}")
    model_step = 32 if sdxl else 64  # the UNet's total downsampling, as sd-scripts' verify_bucket_reso_steps
    if enable_bucket:
        if steps < 1 or steps % model_step != 0:
            raise UserError(f"bucket_reso_steps must be a multiple of {model_step} in {where}, got {steps}")
        if min_reso < 1 or max_reso < min_reso:
            raise UserError(f"need 0 < min_bucket_reso <= max_bucket_reso in {where}, got {min_reso} and {max_reso}")
    step = steps if enable_bucket else model_step
    if resolution[0] % step or resolution[1] % step:
        what = "bucket_reso_steps" if enable_bucket else "the model's step"
        raise UserError(f"resolution {resolution} in {where} must be a multiple of {what} ({step}) on both sides")


def check_validation_split(where: str, kind: str, split) -> None:
    if split in (None, 0, 0.0):
        return
    if not 0 < split < 1:
        raise UserError(f"validation_split must be at least 0 and below 1 in {where}, got {split}")
    if kind != DREAMBOOTH:
        # sd-scripts splits only image_dir subsets; its metadata-file datasets would validate on training images
        raise UserError(f"validation_split needs image_dir (DreamBooth-style) subsets, not metadata_file ones (in {where})")


def adjust_bucket_limits(where, resolution, min_reso: int, max_reso: int, steps: int) -> Tuple[int, int]:
    """Round min/max_bucket_reso to steps (with a warning) and check they bracket the resolution."""
    if min_reso % steps:
        adjusted = min_reso - min_reso % steps
        logger.warning("min_bucket_reso is adjusted to be a multiple of bucket_reso_steps: %d -> %d", min_reso, adjusted)
        min_reso = adjusted
    if max_reso % steps:
        adjusted = max_reso + steps - max_reso % steps
        logger.warning("max_bucket_reso is adjusted to be a multiple of bucket_reso_steps: %d -> %d", max_reso, adjusted)
        max_reso = adjusted
    if min(resolution) < min_reso:
        raise UserError(f"min_bucket_reso ({min_reso}) must not exceed the resolution's smaller side in {where}")
    if max(resolution) > max_reso:
        raise UserError(f"max_bucket_reso ({max_reso}) must not be below the resolution's larger side in {where}")
    return min_reso, max_reso


def check_option_values(where: str, lookup) -> None:
    for rate in ("caption_dropout_rate", "caption_tag_dropout_rate"):
        value = lookup(rate)
        if value is not None and not 0 <= value <= 1:
            raise UserError(f"{rate} must be between 0 and 1 in {where}, got {value}")
    for count in ("keep_tokens", "caption_dropout_every_n_epochs", "token_warmup_min", "token_warmup_step"):
        value = lookup(count)
        if value is not None and value < 0:
            raise UserError(f"{count} must not be negative in {where}, got {value}")
    interpolation = lookup("resize_interpolation")
    if interpolation is not None and interpolation not in RESIZE_INTERPOLATIONS:
        raise UserError(f"resize_interpolation must be one of {', '.join(RESIZE_INTERPOLATIONS)} in {where}, got {interpolation!r}")
    if lookup("network_multiplier") not in (None, 1, 1.0):
        raise UserError(f"network_multiplier other than 1.0 is not supported (in {where})")
    if lookup("face_crop_aug_range") is not None:
        raise UserError(f"face_crop_aug_range is not supported: face-centred crops are not implemented (in {where})")
