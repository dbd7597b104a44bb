"""Check a LoRA file against an SDXL model: does every key map onto it, which keys torch sd-scripts or
ComfyUI would treat differently, the rank and alpha of each block, dtypes and the training metadata.

    python networks/check_compat.py my_lora.safetensors [--model sd_xl_base_1.0.safetensors]

Without --model the SDXL base configuration in configs/sdxl_base is used. Only the file's header and
alpha values are read. The exit code is 1 when something would not load here or in sd-scripts.
"""

import argparse
import os
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.errors import UserError, exit_on_user_error  # noqa: E402
from library.model_configs import sdxl_base_configs  # noqa: E402
from library.safetensors_io import open_safetensors, refuse_pickle  # noqa: E402
from networks.checkpoint_weights import SDXLCheckpointWeights  # noqa: E402
from networks.lora import NETWORK_MODULE  # noqa: E402
from networks.lora_weights import (  # noqa: E402
    ALPHA,
    DOWN,
    LYCORIS_MARKERS,
    UP,
    diffusers_lora_names,
    parse_lora_tensors,
)
from networks.sdxl_lora_modules import LoRAModuleSpec, sdxl_lora_modules  # noqa: E402

KOHYA_PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_")
PEFT_ROOTS = ("unet", "text_encoder", "text_encoder_2")
TEXT_PROJECTION_MODULES = ("lora_te1_text_projection", "lora_te2_text_projection")
EXAMPLES_SHOWN = 3
METADATA_SHOWN = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_base_model_version",
                  "ss_steps", "ss_epoch", "ss_sd_model_name", "modelspec.architecture", "modelspec.title")


@dataclass(frozen=True)
class KeyKind:
    """A kind of key and what each loader does with it."""

    label: str
    stops_loading: bool  # here or in sd-scripts
    comfyui_loads: bool
    here: str
    sd_scripts: str
    comfyui: str


KINDS = {
    "diffusers_name": KeyKind(
        "diffusers-layout UNet module names", False, True, here="renamed to the SGM names and loaded",
        sd_scripts="renamed when a network is built from the file (create_network_from_weights: gen_img, "
                   "--dim_from_weights); skipped by sdxl_merge_lora.py ('no module found') and by --network_weights "
                   "without --dim_from_weights",
        comfyui="loaded"),
    "text_projection": KeyKind(
        "text_projection LoRA", True, True, here="refused: text_projection is not a networks.lora target",
        sd_scripts="ignored (networks.lora has no such module)",
        comfyui="applied to the text encoder's text_projection"),
    "lycoris": KeyKind(
        "LyCORIS tensors (LoHa/LoKr/LoCon mid/DoRA/OFT)", True, True, here="refused: plain LoRA only",
        sd_scripts="ignored by networks.lora (they need LyCORIS' network module)", comfyui="loaded"),
    "peft": KeyKind(
        "diffusers/PEFT-format keys", True, True, here="refused: Kohya names only",
        sd_scripts="ignored", comfyui="loaded"),
    "unknown_prefix": KeyKind(
        "keys without an SDXL Kohya prefix (lora_unet_/lora_te1_/lora_te2_)", True, False, here="refused",
        sd_scripts="ignored", comfyui="ignored ('lora key not loaded')"),
    "unknown_tensor": KeyKind(
        "tensors other than lora_down.weight / lora_up.weight / alpha", True, False, here="refused",
        sd_scripts="ignored", comfyui="ignored"),
    "no_module": KeyKind(
        "modules this SDXL model does not have", True, False, here="refused",
        sd_scripts="ignored (load_state_dict strict=False); sdxl_merge_lora.py: 'no module found'",
        comfyui="ignored ('lora key not loaded')"),
}


def classify_key(key: str, modules: Dict[str, LoRAModuleSpec], aliases: Dict[str, str]) -> Tuple[str, str]:
    """(kind, SGM module name): kind is "ok" or a KINDS key."""
    module, _, part = key.partition(".")
    if module in PEFT_ROOTS or "lora_A" in part or "lora_B" in part:
        return "peft", module
    if any(marker in part for marker in LYCORIS_MARKERS):
        return "lycoris", module
    if part not in (DOWN, UP, ALPHA):
        return "unknown_tensor", module
    if module in TEXT_PROJECTION_MODULES:
        return "text_projection", module
    if not module.startswith(KOHYA_PREFIXES):
        return "unknown_prefix", module
    if module in modules:
        return "ok", module
    if module in aliases:
        return "diffusers_name", aliases[module]
    return "no_module", module


def block_of(spec: LoRAModuleSpec) -> str:
    """TE1, TE2, input_blocks.N, middle_block or output_blocks.N."""
    if spec.root != "unet":
        return spec.root.upper()
    parts = spec.path.split(".")
    return parts[0] if parts[0] == "middle_block" else ".".join(parts[:2])


def _block_order(block: str):
    order = ("TE1", "TE2", "input_blocks", "middle_block", "output_blocks")
    name, _, index = block.partition(".")
    return order.index(name), int(index or 0)


def _stand_in(shape) -> np.ndarray:
    return np.broadcast_to(np.zeros((), np.float32), shape)


@dataclass
class CompatReport:
    lines: List[str]
    stops_loading: bool


def _model_modules(model: Optional[str]):
    if model is None:
        unet, _, te1, te2 = sdxl_base_configs()
        return sdxl_lora_modules(unet, te1, te2), unet, "SDXL base configuration (configs/sdxl_base)"
    with SDXLCheckpointWeights(model) as weights:
        return weights.modules, weights.unet_config, model


def check_compat(path: str, model: Optional[str] = None) -> CompatReport:
    refuse_pickle(path)
    if not path.lower().endswith(".safetensors"):
        raise UserError(f"{path}: only .safetensors LoRA files are supported")
    modules, unet_config, model_label = _model_modules(model)
    aliases = diffusers_lora_names((s.path for s in modules.values() if s.root == "unet"), unet_config)
    with open_safetensors(path) as reader:
        keys = reader.keys()
        shapes = {key: reader.shape(key) for key in keys}
        dtypes = Counter(reader.dtype(key) for key in keys)
        alphas = {key: float(reader.read_float32(key).reshape(-1)[0]) for key in keys
                  if key.endswith("." + ALPHA) and int(np.prod(shapes[key])) == 1}
        metadata = reader.metadata
    if not keys:
        raise UserError(f"{path}: the file holds no tensors")

    by_kind: Dict[str, List[str]] = {}
    found: Dict[str, Dict[str, str]] = {}  # SGM module name -> {part: key}
    for key in sorted(keys):
        kind, module = classify_key(key, modules, aliases)
        if kind != "ok":
            by_kind.setdefault(kind, []).append(key)
        if kind in ("ok", "diffusers_name"):
            found.setdefault(module, {})[key.partition(".")[2]] = key
    if not found and not by_kind.get("lycoris") and not by_kind.get("peft"):
        raise UserError(f"{path}: no LoRA modules in this file (no <module>.lora_down.weight tensors)")

    lines = [f"LoRA: {path}", f"  checked against: {model_label}",
             f"  tensors: {len(keys)} ({', '.join(f'{n} {t}' for t, n in sorted(dtypes.items()))})"]
    lines += _metadata_lines(metadata)
    module_problems, ranks = _module_checks(found, modules, shapes, alphas)
    lines += _block_lines(ranks, modules)
    lines += _kind_lines(by_kind)
    if module_problems:
        lines.append(f"Modules that do not fit ({len(module_problems)}): rejected here; sd-scripts' load_state_dict "
                     "fails on a size mismatch and ComfyUI skips the module")
        lines += [f"  {problem}" for problem in module_problems[:EXAMPLES_SHOWN * 3]]
        if len(module_problems) == len(found) and model is None:
            lines.append("  no module fits SDXL base: if the LoRA is for another model, check it with --model")

    loads_here = _loads_here(path, shapes, alphas, modules, aliases)
    stops = bool(module_problems) or any(KINDS[kind].stops_loading for kind in by_kind)
    lines.append("Verdict:")
    lines.append(f"  this trainer: {'loads' if loads_here is None else 'does not load: ' + loads_here}")
    lines.append("  sd-scripts networks.lora: " + ("loads every tensor" if not stops else "does not load all of it"))
    comfyui_loads = not module_problems and all(KINDS[kind].comfyui_loads for kind in by_kind)
    lines.append("  ComfyUI: " + ("loads every tensor" if comfyui_loads else "skips some tensors"))
    return CompatReport(lines, stops or loads_here is not None)


def _metadata_lines(metadata: Dict[str, str]) -> List[str]:
    lines = ["Metadata:" if metadata else "Metadata: none"]
    lines += [f"  {key}: {metadata[key]}" for key in METADATA_SHOWN if key in metadata]
    module = metadata.get("ss_network_module")
    if module is not None and module != NETWORK_MODULE:
        lines.append(f"  note: trained with {module}; this trainer and sd-scripts' {NETWORK_MODULE} read plain LoRA "
                     "tensors only")
    base = metadata.get("ss_base_model_version")
    if base is not None and not base.startswith("sdxl"):
        lines.append(f"  note: ss_base_model_version {base} is not SDXL")
    return lines


def _module_checks(found, modules, shapes, alphas):
    """(problems, {module: (rank, alpha or None)}) for the modules named as SDXL modules."""
    problems, ranks = [], {}
    for module, parts in sorted(found.items()):
        if DOWN not in parts or UP not in parts:
            missing = DOWN if DOWN not in parts else UP
            problems.append(f"{module}: no {missing}")
            continue
        down, up = shapes[parts[DOWN]], shapes[parts[UP]]
        base = modules[module].shape
        rank = down[0] if down else 0
        if tuple(down) != (rank,) + base[1:] or tuple(up) != (base[0], rank) + (1,) * (len(base) - 2) or rank == 0:
            problems.append(f"{module}: lora_down {list(down)} / lora_up {list(up)} do not fit the model's "
                            f"weight {list(base)}")
            continue
        if ALPHA in parts and parts[ALPHA] not in alphas:
            problems.append(f"{module}: alpha has shape {list(shapes[parts[ALPHA]])}, expected one number")
            continue
        ranks[module] = (rank, alphas.get(parts.get(ALPHA)))
    return problems, ranks


def _block_lines(ranks, modules) -> List[str]:
    if not ranks:
        return []
    per_block: Dict[str, List[Tuple[int, Optional[float]]]] = {}
    for module, rank_alpha in ranks.items():
        per_block.setdefault(block_of(modules[module]), []).append(rank_alpha)
    lines = ["Rank and alpha per block:"]
    for block in sorted(per_block, key=_block_order):
        entries = per_block[block]
        ranks_text = "/".join(str(r) for r in sorted({r for r, _ in entries}))
        alpha_values = sorted({a for _, a in entries if a is not None})
        alpha_text = "/".join(f"{a:g}" for a in alpha_values)
        if any(a is None for _, a in entries):
            alpha_text = (alpha_text + "/" if alpha_text else "") + "none (= rank)"
        lines.append(f"  {block:18} {len(entries):4} modules  rank {ranks_text}  alpha {alpha_text}")
    return lines


def _kind_lines(by_kind: Dict[str, List[str]]) -> List[str]:
    lines = []
    for kind, keys in by_kind.items():
        info = KINDS[kind]
        examples = ", ".join(keys[:EXAMPLES_SHOWN]) + (", ..." if len(keys) > EXAMPLES_SHOWN else "")
        lines.append(f"{'Problem' if info.stops_loading else 'Note'}: {len(keys)} key(s) are {info.label}: {examples}")
        lines.append(f"  here: {info.here}; sd-scripts: {info.sd_scripts}; ComfyUI: {info.comfyui}")
    return lines


def _loads_here(path, shapes, alphas, modules, aliases) -> Optional[str]:
    """None if the trainer's own loader (parse_lora_tensors) accepts the file, else its message."""
    tensors = {key: np.array(alphas[key], np.float32) if key in alphas else _stand_in(shape)
               for key, shape in shapes.items()}
    try:
        parse_lora_tensors(tensors, path, {name: spec.shape for name, spec in modules.items()}, aliases)
    except UserError as error:
        return str(error)
    return None


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lora", type=str, help="LoRA .safetensors file")
    parser.add_argument("--model", type=str, default=None,
                        help="SDXL checkpoint (.safetensors or diffusers folder) to check against; default: SDXL base")
    return parser


def main(argv=None) -> None:
    args = setup_parser().parse_args(argv)
    with exit_on_user_error():
        report = check_compat(args.lora, args.model)
    print("\n".join(report.lines))
    if report.stops_loading:
        sys.exit(1)


if __name__ == "__main__":
    main()
