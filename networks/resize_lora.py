"""Resize a Kohya LoRA to another rank by SVD of each module's delta, as sd-scripts' networks/resize_lora.py.

    python networks/resize_lora.py --model my_lora.safetensors --save_to my_lora_r8.safetensors --new_rank 8
    python networks/resize_lora.py --model my_lora.safetensors --save_to dynamic.safetensors --new_rank 32 \\
        --dynamic_method sv_fro --dynamic_param 0.9 --verbose

Each module keeps its scale (alpha / rank): the new alpha is scale * new rank, so a module resized to
its own rank is unchanged and a lower rank gives the best approximation of the same delta.
"""

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.errors import UserError, exit_on_user_error  # noqa: E402
from library.model_hashes import precalculate_lora_hashes  # noqa: E402
from library.safetensors_io import save_safetensors  # noqa: E402
from networks.lora_files import LoRAFile, read_lora_modules  # noqa: E402
from networks.lora_math import (  # noqa: E402
    DYNAMIC_METHODS,
    Retained,
    factored_svd,
    full_spectrum,
    resized_rank,
    retained,
    top_factors,
)
from networks.lora_weights import ModuleWeights, kohya_state  # noqa: E402
from networks.tool_options import precision_dtype, require_cpu  # noqa: E402


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--save_precision", type=str, default=None,
                        help="precision in saving, float if omitted: float, fp16 or bf16")
    parser.add_argument("--new_rank", type=int, default=4,
                        help="rank of the output LoRA (the maximum, with --dynamic_method)")
    parser.add_argument("--new_conv_rank", type=int, default=None,
                        help="rank for Conv2d modules, --new_rank if omitted")
    parser.add_argument("--save_to", type=str, default=None, help="output .safetensors file")
    parser.add_argument("--model", type=str, default=None, help="LoRA .safetensors file to resize")
    parser.add_argument("--device", type=str, default=None, help="accepted for sd-scripts commands: cpu only")
    parser.add_argument("--verbose", action="store_true", help="print how much of each module's spectrum is kept")
    parser.add_argument("--dynamic_method", type=str, default=None,
                        help=f"choose each module's rank from its singular values: {', '.join(DYNAMIC_METHODS)}")
    parser.add_argument("--dynamic_param", type=float, default=None, help="target for --dynamic_method")
    return parser


@dataclass
class ResizedModule:
    weights: ModuleWeights
    retained: Retained


def resize_module(module: ModuleWeights, max_rank: int, method: Optional[str] = None,
                  param: Optional[float] = None) -> ResizedModule:
    """The module at its new rank, with new alpha = (alpha / old rank) * new rank (computed in float32,
    as sd-scripts does, so the alpha written to metadata matches its digits)."""
    scale = np.float32(module.alpha) / np.float32(module.rank)
    u, s, vh = factored_svd(module.down, module.up)
    flat_in = int(np.prod(module.down.shape[1:]))
    spectrum = full_spectrum(s, min(module.up.shape[0], flat_in))
    rank = resized_rank(spectrum, max_rank, method, param)
    down, up = top_factors(u, s, vh, rank, module.down.shape[1:])
    return ResizedModule(ModuleWeights(down, up, float(scale * np.float32(rank))), retained(spectrum, rank))


def resize_lora(lora: LoRAFile, new_rank: int, new_conv_rank: int, method: Optional[str] = None,
                param: Optional[float] = None) -> Dict[str, ResizedModule]:
    """Every module resized; convolutions (1x1 included, as in sd-scripts) to `new_conv_rank`."""
    return {
        name: resize_module(module, new_conv_rank if module.down.ndim == 4 else new_rank, method, param)
        for name, module in lora.modules.items()
    }


def resized_metadata(metadata: Dict[str, str], old_rank: int, new_rank: int, new_conv_rank: int, new_alpha: float,
                     method: Optional[str], param: Optional[float]) -> Dict[str, str]:
    """The input file's metadata with sd-scripts' updates: training comment, dim and alpha.

    `new_alpha` is the last module's, as sd-scripts records it; dynamic resizing records "Dynamic".
    """
    updated = dict(metadata)
    comment = metadata.get("ss_training_comment", "")
    if method is None:
        conv = "" if new_rank == new_conv_rank else f" (conv: {new_conv_rank})"
        updated["ss_training_comment"] = f"dimension is resized from {old_rank} to {new_rank}{conv}; {comment}"
        updated["ss_network_dim"] = str(new_rank)
        updated["ss_network_alpha"] = str(new_alpha)
    else:
        updated["ss_training_comment"] = f"Dynamic resize with {method}: {param} from {old_rank}; {comment}"
        updated["ss_network_dim"] = "Dynamic"
        updated["ss_network_alpha"] = "Dynamic"
    return updated


def with_lora_hashes(tensors: Dict[str, np.ndarray], metadata: Dict[str, str]) -> Dict[str, str]:
    """`metadata` (every key of the input kept, as sd-scripts) with fresh sshs_* hashes of `tensors`."""
    final = {key: value for key, value in metadata.items() if not key.startswith("sshs_")}
    final["sshs_model_hash"], final["sshs_legacy_hash"] = precalculate_lora_hashes(tensors, final)
    return final


def verbose_report(resized: Dict[str, ResizedModule], dynamic: bool) -> List[str]:
    """sd-scripts' --verbose lines: per module, then the mean Frobenius retention."""
    lines = []
    fro = []
    for name, module in resized.items():
        kept = module.retained
        line = (f"{name:75} | sum(S) retained: {kept.sum_retained:.1%}, fro retained: {kept.fro_retained:.1%}, "
                f"max(S) ratio: {kept.max_ratio:0.1f}")
        if dynamic:
            line += f", dynamic | dim: {module.weights.rank}, alpha: {module.weights.alpha}"
        lines.append(line)
        if not np.isnan(kept.fro_retained):
            fro.append(kept.fro_retained)
    lines.append(f"Average Frobenius norm retention: {np.mean(fro):.2%} | std: {np.std(fro):0.3f}")
    return lines


def _check_args(args) -> None:
    if args.model is None:
        raise UserError("--model: give the LoRA .safetensors file to resize")
    if args.save_to is None or not args.save_to.lower().endswith(".safetensors"):
        raise UserError(f"--save_to {args.save_to}: give a .safetensors output file (.ckpt/.pt are not written)")
    if args.dynamic_method is not None and args.dynamic_method not in DYNAMIC_METHODS:
        raise UserError(f"--dynamic_method {args.dynamic_method}: unknown method "
                        f"(choose from {', '.join(DYNAMIC_METHODS)})")
    if args.dynamic_method is not None and not (args.dynamic_param or 0) > 0:
        raise UserError(f"--dynamic_method {args.dynamic_method} needs a positive --dynamic_param")
    for flag, rank in (("--new_rank", args.new_rank), ("--new_conv_rank", args.new_conv_rank)):
        if rank is not None and rank < 1:
            raise UserError(f"{flag} {rank}: a rank must be at least 1")
    require_cpu("--device", args.device)


def resize(args) -> None:
    _check_args(args)
    new_conv_rank = args.new_conv_rank if args.new_conv_rank is not None else args.new_rank
    save_dtype = precision_dtype(args.save_precision, "--save_precision") or np.dtype(np.float32)
    lora = read_lora_modules(args.model)
    if args.dynamic_method:
        print(f"Dynamically determining new alphas and dims based off {args.dynamic_method}: {args.dynamic_param}, "
              f"max rank is {args.new_rank}")
    resized = resize_lora(lora, args.new_rank, new_conv_rank, args.dynamic_method, args.dynamic_param)
    if args.verbose:
        print("\n".join(verbose_report(resized, args.dynamic_method is not None)))

    old_rank = max(module.rank for module in lora.modules.values())
    last_alpha = list(resized.values())[-1].weights.alpha
    tensors = {name: value.astype(save_dtype)
               for name, value in kohya_state({name: m.weights for name, m in resized.items()}).items()}
    metadata = resized_metadata(lora.metadata, old_rank, args.new_rank, new_conv_rank, last_alpha,
                                args.dynamic_method, args.dynamic_param)
    save_safetensors(tensors, args.save_to, with_lora_hashes(tensors, metadata))
    print(f"resized {len(resized)} modules from rank {old_rank}; saved to {args.save_to}")


def main(argv=None) -> None:
    args = setup_parser().parse_args(argv)
    with exit_on_user_error():
        resize(args)


if __name__ == "__main__":
    main()
