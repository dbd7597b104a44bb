"""Kohya LoRA files: reading them, checking every tensor against a model, and writing them.

A Kohya LoRA file holds, for each adapted module `<name>` (e.g. `lora_unet_input_blocks_4_1_proj_in`):
  <name>.lora_down.weight  [rank, in] (Linear) or [rank, in, k, k] (Conv2d)
  <name>.lora_up.weight    [out, rank] (Linear) or [out, rank, 1, 1] (Conv2d)
  <name>.alpha             0-d; absent in old files, which means alpha = rank
Files from older sd-scripts and some converters name UNet modules in diffusers' layout
(`lora_unet_down_blocks_1_attentions_0_proj_in`); they are renamed to the SGM layout on reading.
"""

import os
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Tuple

import numpy as np

from library import model_conversion
from library.errors import UserError
from library.safetensors_io import open_safetensors
from library.sdxl_unet import UNetConfig

DOWN, UP, ALPHA = "lora_down.weight", "lora_up.weight", "alpha"
UNET_PREFIX = "lora_unet_"

# Tensor-name fragments of LyCORIS algorithms (LoHa, LoKr, LoCon's mid weight, DoRA, OFT, ...).
LYCORIS_MARKERS = ("hada_", "lokr_", "lora_mid", "dora_scale", "oft_", "boft_", "w_norm", "b_norm", "on_input")
# How many problems an error message names before summarising the rest.
PROBLEMS_SHOWN = 3


@dataclass
class ModuleWeights:
    """One module's LoRA tensors as float32 arrays, and its alpha."""

    down: np.ndarray
    up: np.ndarray
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]


def read_lora_file(path) -> Dict[str, np.ndarray]:
    """Every tensor of a .safetensors LoRA file as float32 (fp16 and bf16 files are upcast exactly)."""
    path = os.fspath(path)
    if not path.lower().endswith(".safetensors"):
        raise UserError(f"{path}: only .safetensors LoRA files are supported (convert .ckpt/.pt files first)")
    with open_safetensors(path) as reader:
        return {name: reader.read_float32(name) for name in reader.keys()}


def diffusers_lora_names(sgm_module_paths: Iterable[str], config: UNetConfig) -> Dict[str, str]:
    """Diffusers-layout LoRA module names -> SGM-layout ones, for the given UNet module paths.

    `input_blocks.4.1.proj_in` gives `lora_unet_down_blocks_1_attentions_0_proj_in` ->
    `lora_unet_input_blocks_4_1_proj_in`. Built from the dotted paths, so underscores inside names
    (`transformer_blocks`, `to_out`) never need to be parsed.
    """
    names = {}
    for sgm_path in sgm_module_paths:
        diffusers_path = model_conversion.unet_sgm_module_to_diffusers(sgm_path, config)
        names[lora_module_name(UNET_PREFIX, diffusers_path)] = lora_module_name(UNET_PREFIX, sgm_path)
    return names


def lora_module_name(prefix: str, module_path: str) -> str:
    """`lora_unet_` + `input_blocks.4.1.proj_in` -> `lora_unet_input_blocks_4_1_proj_in`."""
    return prefix + module_path.replace(".", "_")


def parse_lora_tensors(
    tensors: Mapping[str, np.ndarray],
    source: str,
    target_shapes: Mapping[str, Tuple[int, ...]],
    aliases: Mapping[str, str],
    list_unmatched: bool = False,
    owner: str = "this model",
) -> Dict[str, ModuleWeights]:
    """Group a Kohya state dict by module and check each tensor against the module it adapts.

    `target_shapes` maps each module name `owner` can adapt to its base weight shape ([out, in] or
    [out, in, k, k]); `aliases` renames modules first (diffusers -> SGM names). Any tensor that does not
    fit raises one UserError naming it; `list_unmatched` names every such tensor instead of the first few.
    """
    grouped: Dict[str, Dict[str, np.ndarray]] = {}
    problems: List[str] = []
    for key, value in tensors.items():
        module, _, part = key.partition(".")
        module = aliases.get(module, module)
        if any(marker in part for marker in LYCORIS_MARKERS):
            problems.append(f"'{key}' is a LyCORIS tensor (LoHa/LoKr/LoCon mid/DoRA/OFT), not supported yet; "
                            "only plain LoRA (lora_down/lora_up/alpha) is")
        elif part not in (DOWN, UP, ALPHA):
            problems.append(f"'{key}' is not a Kohya LoRA tensor (expected <module>.lora_down.weight, "
                            "<module>.lora_up.weight or <module>.alpha)")
        elif module not in target_shapes:
            problems.append(f"'{key}': {owner} has no LoRA module '{module}'")
        else:
            grouped.setdefault(module, {})[part] = value

    modules = {}
    for module, parts in grouped.items():
        problem = _module_problem(module, parts, target_shapes[module])
        if problem:
            problems.append(problem)
        else:
            alpha = float(parts[ALPHA].reshape(-1)[0]) if ALPHA in parts else None
            rank = parts[DOWN].shape[0]
            modules[module] = ModuleWeights(parts[DOWN], parts[UP], rank if alpha is None else alpha)
    if problems:
        raise UserError(_problems_message(source, problems, list_unmatched))
    return modules


def _module_problem(module: str, parts: Mapping[str, np.ndarray], base_shape: Tuple[int, ...]):
    for part in (DOWN, UP):
        if part not in parts:
            return f"'{module}' has no '{module}.{part}'"
    down, up = parts[DOWN], parts[UP]
    rank = down.shape[0] if down.ndim else 0
    out_dim, in_dim = base_shape[:2]
    kernel = tuple(base_shape[2:])
    expected_down = (rank, in_dim) + kernel
    expected_up = (out_dim, rank) + (1,) * len(kernel)
    if rank == 0 or down.shape != expected_down:
        return f"'{module}.{DOWN}' has shape {list(down.shape)}, this model needs [rank, {', '.join(map(str, expected_down[1:]))}]"
    if up.shape != expected_up:
        return f"'{module}.{UP}' has shape {list(up.shape)}, this model needs {list(expected_up)}"
    if ALPHA in parts and parts[ALPHA].size != 1:
        return f"'{module}.{ALPHA}' has shape {list(parts[ALPHA].shape)}, expected a single number"
    return None


def _problems_message(source: str, problems: List[str], list_unmatched: bool) -> str:
    shown = problems if list_unmatched else problems[:PROBLEMS_SHOWN]
    message = f"{source}: {len(problems)} LoRA tensor(s) do not fit this model: " + "; ".join(shown)
    hidden = len(problems) - len(shown)
    if hidden:
        message += f"; and {hidden} more (list them all with list_unmatched)"
    return message


def kohya_state(modules: Mapping[str, ModuleWeights]) -> Dict[str, np.ndarray]:
    """The tensors of a Kohya LoRA file, float32, alpha as a 0-d array."""
    state = {}
    for name, weights in modules.items():
        state[f"{name}.{DOWN}"] = weights.down
        state[f"{name}.{UP}"] = weights.up
        state[f"{name}.{ALPHA}"] = np.array(weights.alpha, dtype=np.float32)
    return state
