"""Extract a Kohya LoRA from the difference of two SDXL checkpoints by SVD, as sd-scripts'
networks/extract_lora_from_models.py.

    python networks/extract_lora_from_models.py --sdxl --model_org sd_xl_base_1.0.safetensors \\
        --model_tuned my_finetune.safetensors --save_to extracted.safetensors --dim 32 --conv_dim 16

Weights are read one pair at a time from the two files (single files or diffusers folders), so the
memory in use is a few tensors whatever the model size. As in sd-scripts: each module's difference
is factored by SVD to rank `dim` (3x3 convolutions to `conv_dim`, adapted only when it is given),
the factors are clamped to the `clamp_quantile` of their values, alpha equals the rank, and the text
encoders are extracted only when some text encoder weight differs by more than `min_diff`.
"""

import argparse
import json
import os
import sys
import time
from typing import Dict, Iterable, Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.errors import UserError, exit_on_user_error  # noqa: E402
from library.lora_metadata import build_modelspec, finalize_lora_metadata  # noqa: E402
from library.safetensors_io import save_safetensors  # noqa: E402
from networks.checkpoint_weights import SDXLCheckpointWeights  # noqa: E402
from networks.lora import NETWORK_MODULE  # noqa: E402
from networks.lora_math import as_matrix, top_factors  # noqa: E402
from networks.lora_weights import ModuleWeights, kohya_state  # noqa: E402
from networks.sdxl_lora_modules import LoRAModuleSpec  # noqa: E402
from networks.tool_options import precision_dtype, require_cpu, rounded  # noqa: E402

SDXL_BASE_MODEL_VERSION = "sdxl_base_v1-0"


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--v2", action="store_true", help="SD 2.x models: not supported (SDXL only)")
    parser.add_argument("--v_parameterization", action="store_true", default=None,
                        help="record v-prediction in the LoRA's metadata")
    parser.add_argument("--sdxl", action="store_true", help="the models are SDXL (required: SDXL only)")
    parser.add_argument("--load_precision", type=str, default=None,
                        help="round the models' weights to float, fp16 or bf16 before subtracting")
    parser.add_argument("--save_precision", type=str, default=None, help="float (default), fp16 or bf16")
    parser.add_argument("--model_org", type=str, required=True,
                        help="original model: .safetensors file or diffusers folder")
    parser.add_argument("--model_tuned", type=str, required=True,
                        help="tuned model; the LoRA is the difference original -> tuned")
    parser.add_argument("--save_to", type=str, required=True, help="output .safetensors file")
    parser.add_argument("--dim", type=int, default=4, help="rank of the LoRA (default 4)")
    parser.add_argument("--conv_dim", type=int, default=None,
                        help="rank for 3x3 convolutions (default None: ResBlocks and samplers are not extracted)")
    parser.add_argument("--device", type=str, default=None, help="accepted for sd-scripts commands: cpu only")
    parser.add_argument("--clamp_quantile", type=float, default=0.99,
                        help="clamp the factors' values to this quantile of them (0-1, default 0.99)")
    parser.add_argument("--min_diff", type=float, default=0.01,
                        help="the text encoders are extracted only if one of their weights differs by more than "
                             "this (default 0.01)")
    parser.add_argument("--no_metadata", action="store_true",
                        help="do not save sai modelspec metadata (the minimum ss_* metadata is saved)")
    for flag in ("--load_original_model_to", "--load_tuned_model_to"):
        parser.add_argument(flag, type=str, default=None, help="accepted for sd-scripts commands: cpu only")
    return parser


def low_rank_difference(diff: np.ndarray, rank: int, clamp_quantile: float) -> ModuleWeights:
    """sd-scripts' extraction of one module: SVD of the difference ([out, in * k * k] for convolutions),
    up = U_r diag(S_r) and down = Vh_r, both clamped to +-quantile(|values| of both), alpha = rank."""
    out_dim, in_dim = diff.shape[:2]
    rank = min(rank, in_dim, out_dim)
    u, s, vh = np.linalg.svd(as_matrix(diff), full_matrices=False)
    down, up = top_factors(u, s, vh, rank, diff.shape[1:])
    limit = np.quantile(np.concatenate([up.reshape(-1), down.reshape(-1)]), clamp_quantile)
    return ModuleWeights(np.clip(down, -limit, limit), np.clip(up, -limit, limit), rank)


def _difference(original: SDXLCheckpointWeights, tuned: SDXLCheckpointWeights, spec: LoRAModuleSpec,
                load_dtype) -> np.ndarray:
    # In a lower --load_precision sd-scripts subtracts the rounded weights, and the result rounds too.
    return rounded(rounded(tuned.read(spec), load_dtype) - rounded(original.read(spec), load_dtype), load_dtype)


def text_encoders_differ(original, tuned, specs: Iterable[LoRAModuleSpec], min_diff: float, load_dtype) -> bool:
    for spec in specs:
        largest = float(np.max(np.abs(_difference(original, tuned, spec, load_dtype))))
        if largest > min_diff:
            print(f"Text encoder is different. {largest} > {min_diff}")
            return True
    print("Text encoder is same. Extract U-Net only.")
    return False


def extract_modules(original: SDXLCheckpointWeights, tuned: SDXLCheckpointWeights, dim: int, conv_dim: Optional[int],
                    clamp_quantile: float, min_diff: float, load_dtype=None) -> Dict[str, ModuleWeights]:
    """{Kohya module name: extracted LoRA weights}, one module's pair of base weights in memory at a time."""
    if set(original.modules) != set(tuned.modules) or original.unet_config != tuned.unet_config:
        raise UserError(f"{original.path} and {tuned.path} are not the same architecture (their layers differ)")
    specs = [spec for spec in original.modules.values() if conv_dim is not None or not spec.in_conv_block]
    text_encoder_specs = [spec for spec in specs if spec.root != "unet"]
    if not text_encoders_differ(original, tuned, text_encoder_specs, min_diff, load_dtype):
        specs = [spec for spec in specs if spec.root == "unet"]
    modules = {}
    for spec in specs:
        rank = conv_dim if spec.is_conv3x3 else dim
        modules[spec.lora_name] = low_rank_difference(_difference(original, tuned, spec, load_dtype), rank,
                                                      clamp_quantile)
    return modules


def extraction_metadata(dim: int, conv_dim: Optional[int], v_parameterization: bool, save_to: str,
                        no_metadata: bool) -> Dict[str, str]:
    """sd-scripts' minimum network metadata, plus the modelspec unless --no_metadata."""
    network_args = {} if conv_dim is None else {"conv_dim": str(conv_dim), "conv_alpha": str(float(conv_dim))}
    metadata = {
        "ss_v2": "False",
        "ss_base_model_version": SDXL_BASE_MODEL_VERSION,
        "ss_network_module": NETWORK_MODULE,
        "ss_network_dim": str(dim),
        "ss_network_alpha": str(float(dim)),
        "ss_network_args": json.dumps(network_args),
    }
    if not no_metadata:
        title = os.path.splitext(os.path.basename(save_to))[0]
        metadata.update(build_modelspec(title=title, v_parameterization=bool(v_parameterization),
                                        timestamp=time.time()))
    return metadata


def _check_args(args) -> None:
    if args.v2:
        raise UserError("--v2: SD 2.x models are not supported; this trainer extracts from SDXL models (--sdxl)")
    if not args.sdxl:
        raise UserError("--sdxl is required: only SDXL models are supported (SD 1.x/2.x are not)")
    if not args.save_to.lower().endswith(".safetensors"):
        raise UserError(f"--save_to {args.save_to}: give a .safetensors output file (.ckpt/.pt are not written)")
    for flag, rank in (("--dim", args.dim), ("--conv_dim", args.conv_dim)):
        if rank is not None and rank < 1:
            raise UserError(f"{flag} {rank}: a rank must be at least 1")
    if not 0 < args.clamp_quantile <= 1:
        raise UserError(f"--clamp_quantile {args.clamp_quantile}: must be in (0, 1]")
    for flag in ("--device", "--load_original_model_to", "--load_tuned_model_to"):
        require_cpu(flag, getattr(args, flag[2:]))


def extract(args) -> None:
    _check_args(args)
    load_dtype = precision_dtype(args.load_precision, "--load_precision")
    save_dtype = precision_dtype(args.save_precision, "--save_precision") or np.dtype(np.float32)
    with SDXLCheckpointWeights(args.model_org) as original, SDXLCheckpointWeights(args.model_tuned) as tuned:
        modules = extract_modules(original, tuned, args.dim, args.conv_dim, args.clamp_quantile, args.min_diff,
                                  load_dtype)
    tensors = {name: value.astype(save_dtype) for name, value in kohya_state(modules).items()}
    metadata = extraction_metadata(args.dim, args.conv_dim, args.v_parameterization, args.save_to, args.no_metadata)
    save_safetensors(tensors, args.save_to, finalize_lora_metadata(tensors, metadata))
    text_encoder_modules = sum(1 for name in modules if not name.startswith("lora_unet_"))
    print(f"extracted {len(modules)} modules ({text_encoder_modules} in the text encoders); saved to {args.save_to}")


def main(argv=None) -> None:
    args = setup_parser().parse_args(argv)
    with exit_on_user_error():
        extract(args)


if __name__ == "__main__":
    main()
