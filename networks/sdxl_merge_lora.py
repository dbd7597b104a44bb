"""Merge Kohya LoRAs into an SDXL checkpoint, or into one LoRA, as sd-scripts' networks/sdxl_merge_lora.py.

    python networks/sdxl_merge_lora.py --sd_model sd_xl_base_1.0.safetensors --save_to merged.safetensors \\
        --models style.safetensors character.safetensors --ratios 0.8 0.5
    python networks/sdxl_merge_lora.py --save_to combined.safetensors --models a.safetensors b.safetensors \\
        --ratios 1.0 0.6

Into a checkpoint, each module's base weight becomes W + ratio * alpha / rank * up @ down.

Into one LoRA, sd-scripts' rule is kept as it is, which is not the sum of the deltas: every file's
lora_down is scaled by s = sqrt(alpha / base_alpha) * ratio and its lora_up by |s| (base_alpha: the
first file's alpha for that module), then the scaled factors are added (equal ranks needed) or, with
--concat, stacked into a LoRA of the summed rank. The merged delta is therefore
(sum_i |s_i| up_i)(sum_i s_i down_i) * base_alpha / rank, and with --concat
sum_i ratio_i |ratio_i| alpha_i / (total rank) * up_i @ down_i.
"""

import argparse
import itertools
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import mindspore as ms
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.errors import UserError, exit_on_user_error  # noqa: E402
from library.lora_metadata import build_modelspec, finalize_lora_metadata  # noqa: E402
from library.model_loading import load_sdxl, single_file_entries  # noqa: E402
from library.safetensors_io import read_metadata, save_safetensors, save_safetensors_streaming  # noqa: E402
from networks.lora import NETWORK_MODULE, lora_targets  # noqa: E402
from networks.lora_files import read_lora_modules  # noqa: E402
from networks.lora_math import lora_delta  # noqa: E402
from networks.lora_weights import (  # noqa: E402
    ALPHA,
    DOWN,
    UP,
    diffusers_lora_names,
    parse_lora_tensors,
    read_lora_file,
)
from networks.tool_options import precision_dtype, rounded  # noqa: E402

SDXL_CHECKPOINT_ARCHITECTURE = "stable-diffusion-xl-v1-base"

# ---- Layer-block weights (--lbws), sd-scripts' svd_merge_lora.py presets --------------------------

LBW_BLOCKS = ["BASE"] + [f"IN{i:02d}" for i in range(12)] + ["MID"] + [f"OUT{i:02d}" for i in range(12)]
# For each accepted list length, the blocks its values apply to, in order.
LBW_PRESETS = {
    12: ["BASE", "IN04", "IN05", "IN07", "IN08", "MID"] + [f"OUT{i:02d}" for i in range(6)],
    17: ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID"] + [f"OUT{i:02d}" for i in range(3, 12)],
    20: ["BASE"] + [f"IN{i:02d}" for i in range(9)] + ["MID"] + [f"OUT{i:02d}" for i in range(9)],
    26: list(LBW_BLOCKS),
}


def parse_lbws(lbws: Sequence[str]) -> List[Dict[int, float]]:
    """Each --lbws JSON list -> {block index: weight} for the blocks its preset covers."""
    try:
        lists = [json.loads(lbw) for lbw in lbws]
    except json.JSONDecodeError:
        raise UserError(f"--lbws {' '.join(lbws)}: each value must be a JSON list such as [1,0.5,...]") from None
    if not all(isinstance(weights, list) and all(isinstance(w, (int, float)) for w in weights) for weights in lists):
        raise UserError("--lbws: each value must be a JSON list of numbers")
    lengths = {len(weights) for weights in lists}
    if len(lengths) != 1 or next(iter(lengths)) not in LBW_PRESETS:
        raise UserError(f"--lbws: all lists must have the same length, one of {', '.join(map(str, LBW_PRESETS))} "
                        f"(got {', '.join(str(len(w)) for w in lists)})")
    return [{LBW_BLOCKS.index(block): float(w) for block, w in zip(LBW_PRESETS[len(weights)], weights)}
            for weights in lists]


def lbw_block_index(lora_name: str) -> int:
    """sd-scripts' SDXL layer-block index of a module: 0 text encoders, 1 + n input_blocks.n, 13 middle,
    14 + n output_blocks.n (-1: no block)."""
    if "text_model_encoder_" in lora_name:
        return 0
    parts = lora_name[len("lora_unet_"):].split("_") if lora_name.startswith("lora_unet_") else []
    if parts[:2] == ["input", "blocks"]:
        return 1 + int(parts[2])
    if parts[:2] == ["middle", "block"]:
        return 13
    if parts[:2] == ["output", "blocks"]:
        return 14 + int(parts[2])
    return -1


def lbw_factor(block_weights: Optional[Dict[int, float]], lora_name: str) -> float:
    if not block_weights:
        return 1.0
    return block_weights.get(lbw_block_index(lora_name), 1.0)


# ---- LoRAs into one LoRA -------------------------------------------------------------------------


def _unique_or_dynamic(values) -> str:
    distinct = list(dict.fromkeys(values))  # 4 and 4.0 are one value; the first seen is printed
    return f"{distinct[0]}" if len(distinct) == 1 else "Dynamic"


def _alpha_in(alpha, merge_dtype):
    """A stored alpha as read in the merge precision; a missing one (the rank, an int) stays an int."""
    return alpha if isinstance(alpha, int) else float(rounded(np.float32(alpha), merge_dtype))


def merge_lora_models(paths: Sequence[str], ratios: Sequence[float], lbws: Sequence[Dict[int, float]],
                      merge_dtype, concat: bool = False, shuffle: bool = False,
                      rng: Optional[np.random.Generator] = None) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """(merged Kohya tensors, float32 holding values in `merge_dtype`; sd-scripts' minimum metadata)."""
    merged: Dict[str, np.ndarray] = {}
    base_alphas: Dict[str, float] = {}
    base_dims: Dict[str, int] = {}
    v2 = base_model = None
    for path, ratio, block_weights in itertools.zip_longest(paths, ratios, lbws):
        lora = read_lora_modules(path)
        v2 = v2 if v2 is not None else lora.metadata.get("ss_v2")
        base_model = base_model if base_model is not None else lora.metadata.get("ss_base_model_version")
        alphas = {}
        for name, module in lora.modules.items():
            alpha = _alpha_in(module.alpha, merge_dtype)
            alphas[name] = alpha
            base_alphas.setdefault(name, alpha)
            base_dims.setdefault(name, module.rank)
        print(f"{path}: dim {sorted({m.rank for m in lora.modules.values()})}, alpha {sorted(set(alphas.values()))}")

        for name, module in lora.modules.items():
            scale = math.sqrt(alphas[name] / base_alphas[name]) * ratio
            factor = lbw_factor(block_weights, name)
            # A negative ratio flips the delta's sign through lora_down only.
            for part, value, part_scale, axis in ((DOWN, module.down, scale, 0), (UP, module.up, abs(scale), 1)):
                key = f"{name}.{part}"
                scaled = rounded(rounded(value, merge_dtype) * (part_scale * factor), merge_dtype)
                if key not in merged:
                    merged[key] = scaled
                elif concat:
                    merged[key] = np.concatenate([merged[key], scaled], axis=axis)
                elif merged[key].shape != scaled.shape:
                    raise UserError(f"{path}: '{key}' has shape {list(scaled.shape)}, the LoRAs before it "
                                    f"{list(merged[key].shape)}; files of different ranks merge only with --concat")
                else:
                    merged[key] = rounded(merged[key] + scaled, merge_dtype)

    rng = rng or np.random.default_rng()
    for name, alpha in base_alphas.items():
        merged[f"{name}.{ALPHA}"] = rounded(np.array(alpha, np.float32), merge_dtype)
        if shuffle:
            permutation = rng.permutation(merged[f"{name}.{DOWN}"].shape[0])
            merged[f"{name}.{DOWN}"] = merged[f"{name}.{DOWN}"][permutation]
            merged[f"{name}.{UP}"] = merged[f"{name}.{UP}"][:, permutation]

    metadata = {
        "ss_network_module": NETWORK_MODULE,
        "ss_network_dim": _unique_or_dynamic(base_dims.values()),
        "ss_network_alpha": _unique_or_dynamic(base_alphas.values()),
    }
    if v2 is not None:
        metadata["ss_v2"] = v2
    if base_model is not None:
        metadata["ss_base_model_version"] = base_model
    print(f"merged: dim {metadata['ss_network_dim']}, alpha {metadata['ss_network_alpha']}")
    return merged, metadata


# ---- LoRAs into a checkpoint ---------------------------------------------------------------------


def merge_into_models(models, paths: Sequence[str], ratios: Sequence[float], lbws: Sequence[Dict[int, float]],
                      merge_dtype=None) -> None:
    """Add ratio * alpha / rank * up @ down of every file's modules to the SDXLModels' weights in place.

    Every tensor of every file must fit the model (UserError naming it otherwise); diffusers-named
    UNet modules are renamed as the trainer's loader does. In a lower `merge_dtype` the whole model is
    rounded first, as sd-scripts casts the model before merging.
    """
    if merge_dtype is not None and merge_dtype != np.float32:
        for root in models.text_encoders + [models.unet]:
            for param in root.get_parameters():
                param.set_data(ms.Tensor(rounded(param.asnumpy(), merge_dtype), dtype=param.dtype))
    targets = {t.lora_name: t for t in lora_targets(models.text_encoders, models.unet)}
    shapes = {name: tuple(t.cell.weight.shape) for name, t in targets.items()}
    aliases = diffusers_lora_names((t.path for t in targets.values() if t.is_unet), models.unet.config)
    for path, ratio, block_weights in itertools.zip_longest(paths, ratios, lbws):
        print(f"merging {path} at {ratio}")
        for name, module in parse_lora_tensors(read_lora_file(path), path, shapes, aliases).items():
            down, up = rounded(module.down, merge_dtype), rounded(module.up, merge_dtype)
            scale = float(rounded(np.float32(module.alpha), merge_dtype)) / module.rank
            delta = lora_delta(down, up, scale) * (ratio * lbw_factor(block_weights, name))
            weight = targets[name].cell.weight
            merged = rounded(weight.asnumpy().astype(np.float32) + delta, merge_dtype)
            weight.set_data(ms.Tensor(merged, dtype=weight.dtype))


def merged_from(paths: Sequence[str]) -> str:
    """sd-scripts' modelspec.merged_from: each input's modelspec title, or its file name."""
    titles = []
    for path in paths:
        metadata = read_metadata(path) if path.lower().endswith(".safetensors") and os.path.isfile(path) else {}
        titles.append(metadata.get("modelspec.title") or os.path.splitext(os.path.basename(path.rstrip("/")))[0])
    return ", ".join(titles)


def _modelspec(save_to: str, sources: Sequence[str], architecture: Optional[str] = None) -> Dict[str, str]:
    title = os.path.splitext(os.path.basename(save_to))[0]
    spec = build_modelspec(title=title, merged_from=merged_from(sources), timestamp=time.time())
    if architecture is not None:
        spec["modelspec.architecture"] = architecture
    return spec


# ---- Command line --------------------------------------------------------------------------------


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--save_precision", type=str, default=None,
                        help="precision in saving: float, fp16 or bf16; same as --precision if omitted")
    parser.add_argument("--precision", type=str, default="float",
                        help="precision in merging: float (recommended), fp16 or bf16")
    parser.add_argument("--sd_model", type=str, default=None,
                        help="SDXL checkpoint (.safetensors or diffusers folder) to merge into; LoRAs are merged "
                             "into one LoRA if omitted")
    parser.add_argument("--save_to", type=str, default=None, help="output .safetensors file")
    parser.add_argument("--models", type=str, nargs="*", help="LoRA .safetensors files to merge")
    parser.add_argument("--ratios", type=float, nargs="*", help="ratio for each model")
    parser.add_argument("--lbws", type=str, nargs="*",
                        help="layer-block weights for each model: JSON lists of 12, 17, 20 or 26 numbers")
    parser.add_argument("--no_metadata", action="store_true",
                        help="do not save sai modelspec metadata (the minimum ss_* metadata of a LoRA is saved)")
    parser.add_argument("--concat", action="store_true",
                        help="concatenate the LoRAs instead of adding them (the output's rank is the sum of ranks)")
    parser.add_argument("--shuffle", action="store_true", help="shuffle the order of each module's ranks")
    return parser


def _check_args(args) -> Tuple[List[Dict[int, float]], Optional[np.dtype], Optional[np.dtype]]:
    if not args.models:
        raise UserError("--models: give the LoRA .safetensors files to merge")
    if args.ratios is None or len(args.ratios) != len(args.models):
        raise UserError(f"--ratios: give one ratio per model ({len(args.models)} models, "
                        f"{len(args.ratios or [])} ratios)")
    if args.save_to is None or not args.save_to.lower().endswith(".safetensors"):
        raise UserError(f"--save_to {args.save_to}: give a .safetensors output file (.ckpt is not written)")
    lbws = []
    if args.lbws:
        if len(args.lbws) != len(args.models):
            raise UserError(f"--lbws: give one list per model ({len(args.models)} models, {len(args.lbws)} lists)")
        lbws = parse_lbws(args.lbws)
    merge_dtype = precision_dtype(args.precision, "--precision")
    save_dtype = precision_dtype(args.save_precision, "--save_precision") or merge_dtype
    return lbws, merge_dtype, save_dtype


def merge(args) -> None:
    lbws, merge_dtype, save_dtype = _check_args(args)
    if args.sd_model is not None:
        print(f"loading SD model: {args.sd_model}")
        models = load_sdxl(args.sd_model)
        merge_into_models(models, args.models, args.ratios, lbws, merge_dtype)
        metadata = None if args.no_metadata else _modelspec(args.save_to, [args.sd_model] + args.models,
                                                             SDXL_CHECKPOINT_ARCHITECTURE)
        print(f"saving SD model to: {args.save_to}")
        save_safetensors_streaming(single_file_entries(models, save_dtype), args.save_to, metadata)
        return

    state, metadata = merge_lora_models(args.models, args.ratios, lbws, merge_dtype, args.concat, args.shuffle)
    state = {key: value.astype(save_dtype) for key, value in state.items()}
    if not args.no_metadata:
        metadata.update(_modelspec(args.save_to, args.models))
    print(f"saving model to: {args.save_to}")
    save_safetensors(state, args.save_to, finalize_lora_metadata(state, metadata))


def main(argv=None) -> None:
    args = setup_parser().parse_args(argv)
    with exit_on_user_error():
        merge(args)


if __name__ == "__main__":
    main()
