"""The metadata sd-scripts stores in a LoRA .safetensors file, reproduced key for key.

A saved LoRA carries three families of string entries:
- `ss_*`: the training run (hyperparameters, dataset summary, base model hashes),
- `modelspec.*`: Stability AI's ModelSpec 1.0.1 description of the model,
- `sshs_*`: precalculated hashes of the file for sd-webui-additional-networks.
The trainer assembles the first two; `finalize_lora_metadata` turns them into exactly
what sd-scripts would write.
"""

import base64
import datetime
import mimetypes
import os
import time

import numpy as np

from library.errors import UserError
from library.model_hashes import base_model_hashes, precalculate_lora_hashes
from library.version import PROJECT_NAME, __version__

# Every ss_* key sd-scripts writes for an SDXL LoRA run configured with --dataset_config
# (measured from a torch sd-scripts run; see shared/reference/sdxl-lora-metadata-example.json).
SS_TRAINING_KEYS = [
    "ss_adaptive_noise_scale",
    "ss_base_model_version",
    "ss_cache_latents",
    "ss_caption_dropout_every_n_epochs",
    "ss_caption_dropout_rate",
    "ss_caption_tag_dropout_rate",
    "ss_clip_skip",
    "ss_dataset_dirs",
    "ss_datasets",
    "ss_debiased_estimation",
    "ss_epoch",
    "ss_face_crop_aug_range",
    "ss_fp8_base",
    "ss_fp8_base_unet",
    "ss_full_fp16",
    "ss_gradient_accumulation_steps",
    "ss_gradient_checkpointing",
    "ss_huber_c",
    "ss_huber_scale",
    "ss_huber_schedule",
    "ss_ip_noise_gamma",
    "ss_ip_noise_gamma_random_strength",
    "ss_learning_rate",
    "ss_loss_type",
    "ss_lowram",
    "ss_lr_scheduler",
    "ss_lr_warmup_steps",
    "ss_max_grad_norm",
    "ss_max_token_length",
    "ss_max_train_steps",
    "ss_max_validation_steps",
    "ss_min_snr_gamma",
    "ss_mixed_precision",
    "ss_multires_noise_discount",
    "ss_multires_noise_iterations",
    "ss_network_alpha",
    "ss_network_dim",
    "ss_network_dropout",
    "ss_network_module",
    "ss_new_sd_model_hash",
    "ss_noise_offset",
    "ss_noise_offset_random_strength",
    "ss_num_batches_per_epoch",
    "ss_num_epochs",
    "ss_num_reg_images",
    "ss_num_train_images",
    "ss_num_validation_images",
    "ss_optimizer",
    "ss_output_name",
    "ss_prior_loss_weight",
    "ss_resize_interpolation",
    "ss_scale_weight_norms",
    "ss_sd_model_hash",
    "ss_sd_model_name",
    "ss_sd_scripts_commit_hash",
    "ss_seed",
    "ss_session_id",
    "ss_steps",
    "ss_tag_frequency",
    "ss_text_encoder_lr",
    "ss_training_comment",
    "ss_training_finished_at",
    "ss_training_started_at",
    "ss_unet_lr",
    "ss_v2",
    "ss_validate_every_n_epochs",
    "ss_validate_every_n_steps",
    "ss_validation_seed",
    "ss_validation_split",
    "ss_zero_terminal_snr",
]

# Present only when the option behind them is given (--network_args, --vae).
SS_OPTIONAL_KEYS = ["ss_network_args", "ss_new_vae_hash", "ss_vae_hash", "ss_vae_name"]

# Without --dataset_config (plain --train_data_dir), sd-scripts writes these flat keys
# in addition to SS_TRAINING_KEYS, and leaves out "ss_datasets".
SS_TRAIN_DATA_DIR_KEYS = [
    "ss_batch_size_per_device",
    "ss_bucket_info",
    "ss_bucket_no_upscale",
    "ss_color_aug",
    "ss_enable_bucket",
    "ss_flip_aug",
    "ss_keep_tokens",
    "ss_max_bucket_reso",
    "ss_min_bucket_reso",
    "ss_random_crop",
    "ss_reg_dataset_dirs",
    "ss_resolution",
    "ss_shuffle_caption",
    "ss_total_batch_size",
]

# What --no_metadata keeps: just enough for UIs to tell which network and base model it is.
SS_MINIMUM_KEYS = [
    "ss_v2",
    "ss_base_model_version",
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_network_args",
]

MODELSPEC_VERSION = "1.0.1"
SDXL_LORA_ARCHITECTURE = "stable-diffusion-xl-v1-base/lora"
SDXL_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"
SDXL_DEFAULT_RESOLUTION = (1024, 1024)
DEFAULT_MAX_TIMESTEP = 1000


def build_modelspec(
    *,
    title: str | None,
    resolution: int | str | tuple[int, ...] | None = None,
    v_parameterization: bool = False,
    min_timestep: int | None = None,
    max_timestep: int | None = None,
    clip_skip: int | None = None,
    author: str | None = None,
    description: str | None = None,
    license: str | None = None,
    tags: str | None = None,
    usage_hint: str | None = None,
    thumbnail: str | None = None,
    merged_from: str | None = None,
    trigger_phrase: str | None = None,
    preprocessor: str | None = None,
    is_negative_embedding: str | None = None,
    timestamp: float | None = None,
) -> dict[str, str]:
    """The `modelspec.*` entries sd-scripts writes for an SDXL LoRA.

    `title` is --metadata_title or else --output_name; `resolution` is --resolution in any
    of the forms sd-scripts accepts ("512", "512,768", 512, (512, 768)). `thumbnail` may be a
    data URL or an image path, which is embedded as a data URL. The remaining optional
    fields mirror the --metadata_* options and are written only when given.
    """
    timestamp = time.time() if timestamp is None else timestamp
    spec = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": SDXL_LORA_ARCHITECTURE,
        "modelspec.implementation": SDXL_IMPLEMENTATION,
        "modelspec.title": title if title is not None else f"LoRA@{timestamp}",
        "modelspec.resolution": _resolution_text(resolution),
        # Local wall-clock time without microseconds or zone, as sd-scripts writes it.
        "modelspec.date": datetime.datetime.fromtimestamp(int(timestamp)).isoformat(),
        "modelspec.prediction_type": "v" if v_parameterization else "epsilon",
        "modelspec.implementation_version": f"{PROJECT_NAME}/{__version__}",
    }
    if min_timestep is not None or max_timestep is not None:
        low = min_timestep if min_timestep is not None else 0
        high = max_timestep if max_timestep is not None else DEFAULT_MAX_TIMESTEP
        spec["modelspec.timestep_range"] = f"{low},{high}"
    if clip_skip is not None:
        spec["modelspec.encoder_layer"] = f"{clip_skip}"
    if thumbnail is not None:
        thumbnail = thumbnail if thumbnail.startswith("data:") else _image_as_data_url(thumbnail)
    optional = {
        "author": author,
        "description": description,
        "license": license,
        "tags": tags,
        "usage_hint": usage_hint,
        "thumbnail": thumbnail,
        "merged_from": merged_from,
        "trigger_phrase": trigger_phrase,
        "preprocessor": preprocessor,
        "is_negative_embedding": is_negative_embedding,
    }
    spec.update({f"modelspec.{name}": value for name, value in optional.items() if value is not None})
    return spec


def modelspec_from_args(args, timestamp: float | None = None) -> dict[str, str]:
    """`build_modelspec` fed from an sd-scripts style argument namespace."""
    return build_modelspec(
        title=args.metadata_title if args.metadata_title is not None else args.output_name,
        resolution=args.resolution,
        v_parameterization=args.v_parameterization,
        min_timestep=args.min_timestep,
        max_timestep=args.max_timestep,
        clip_skip=args.clip_skip,
        author=args.metadata_author,
        description=args.metadata_description,
        license=args.metadata_license,
        tags=args.metadata_tags,
        usage_hint=args.metadata_usage_hint,
        thumbnail=args.metadata_thumbnail,
        merged_from=args.metadata_merged_from,
        trigger_phrase=args.metadata_trigger_phrase,
        preprocessor=args.metadata_preprocessor,
        is_negative_embedding=args.metadata_is_negative_embedding,
        timestamp=timestamp,
    )


def _resolution_text(resolution) -> str:
    if resolution is None:
        resolution = SDXL_DEFAULT_RESOLUTION
    if isinstance(resolution, str):
        resolution = tuple(int(side) for side in resolution.split(","))
    if isinstance(resolution, int):
        resolution = (resolution,)
    width, height = (resolution[0], resolution[0]) if len(resolution) == 1 else resolution
    return f"{width}x{height}"


def _image_as_data_url(path: str) -> str:
    if not os.path.isfile(path):
        raise UserError(f"--metadata_thumbnail: image file {path} not found (give an image path or a data: URL)")
    mime_type = mimetypes.guess_type(path)[0] or "application/octet-stream"
    with open(path, "rb") as image:
        encoded = base64.b64encode(image.read()).decode("ascii")
    return f"data:{mime_type};base64,{encoded}"


def source_model_metadata(pretrained_model_name_or_path: str | None, vae: str | None = None) -> dict[str, str]:
    """The ss_* entries naming and hashing the base model and VAE.

    Hashes are recorded only for paths that exist, and names then lose their folder,
    exactly as sd-scripts does.
    """
    entries = {}
    for path, name_key, legacy_key, sha256_key in (
        (pretrained_model_name_or_path, "ss_sd_model_name", "ss_sd_model_hash", "ss_new_sd_model_hash"),
        (vae, "ss_vae_name", "ss_vae_hash", "ss_new_vae_hash"),
    ):
        if path is None:
            continue
        name = path
        if os.path.exists(path):
            entries[legacy_key], entries[sha256_key] = base_model_hashes(path)
            name = os.path.basename(path)
        entries[name_key] = name
    return entries


def finalize_lora_metadata(
    tensors: dict[str, np.ndarray], metadata: dict, no_metadata: bool = False
) -> dict[str, str]:
    """The exact metadata to save with `tensors` (already in their save dtype).

    `metadata` holds the run's ss_* entries merged with `build_modelspec(...)`; values
    may be any type and are stored as `str(value)`, as sd-scripts does ("None", "True",
    "0.0001"). With `no_metadata` only SS_MINIMUM_KEYS and the modelspec survive. The
    sshs_* hashes are always added, computed over the tensors and surviving ss_* entries.
    """
    unexpected = [key for key in metadata if not key.startswith(("ss_", "modelspec.", "sshs_"))]
    if unexpected:
        raise ValueError(f"LoRA metadata keys must start with ss_ or modelspec.: {unexpected}")
    # Earlier hashes are dropped: they describe whatever was saved last time.
    final = {key: str(value) for key, value in metadata.items() if not key.startswith("sshs_")}
    if no_metadata:
        final = {key: value for key, value in final.items() if key in SS_MINIMUM_KEYS or key.startswith("modelspec.")}
    model_hash, legacy_hash = precalculate_lora_hashes(tensors, final)
    final["sshs_model_hash"] = model_hash
    final["sshs_legacy_hash"] = legacy_hash
    return final
