"""Kohya LoRA files as the standalone tools (merge, resize) read them: tensors grouped by module without
a model to check them against, and the file's metadata."""

import os
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np

from library.errors import UserError
from library.safetensors_io import read_metadata
from networks.lora_weights import ALPHA, DOWN, LYCORIS_MARKERS, UP, ModuleWeights, read_lora_file

PROBLEMS_SHOWN = 3


@dataclass
class LoRAFile:
    path: str
    modules: Dict[str, ModuleWeights]
    metadata: Dict[str, str]


def read_lora_modules(path) -> LoRAFile:
    """Every module of a Kohya LoRA file as float32 ModuleWeights, in file (sorted) order.

    A module without an alpha tensor gets its rank as a Python int: sd-scripts uses the rank then and
    prints it without a decimal point in merged metadata ("8", where a stored alpha prints "8.0").
    Anything but lora_down / lora_up / alpha tensors raises one UserError naming it.
    """
    path = os.fspath(path)
    tensors = read_lora_file(path)
    grouped: Dict[str, Dict[str, np.ndarray]] = {}
    problems: List[str] = []
    for key in sorted(tensors):
        module, _, part = key.partition(".")
        if any(marker in part for marker in LYCORIS_MARKERS):
            problems.append(f"'{key}' is a LyCORIS tensor (LoHa/LoKr/LoCon mid/DoRA/OFT)")
        elif part not in (DOWN, UP, ALPHA):
            problems.append(f"'{key}' is not <module>.lora_down.weight, <module>.lora_up.weight or <module>.alpha")
        else:
            grouped.setdefault(module, {})[part] = tensors[key]

    modules = {}
    for module, parts in grouped.items():
        problem = _module_problem(module, parts)
        if problem:
            problems.append(problem)
            continue
        down, up = parts[DOWN], parts[UP]
        alpha = float(parts[ALPHA].reshape(-1)[0]) if ALPHA in parts else down.shape[0]
        modules[module] = ModuleWeights(down, up, alpha)
    if problems:
        shown = "; ".join(problems[:PROBLEMS_SHOWN])
        more = f"; and {len(problems) - PROBLEMS_SHOWN} more" if len(problems) > PROBLEMS_SHOWN else ""
        raise UserError(f"{path}: not a plain Kohya LoRA file: {shown}{more}")
    if not modules:
        raise UserError(f"{path}: no LoRA modules in this file (no <module>.lora_down.weight tensors)")
    return LoRAFile(path, modules, read_metadata(path))


def _module_problem(module: str, parts: Dict[str, np.ndarray]) -> Optional[str]:
    for part in (DOWN, UP):
        if part not in parts:
            return f"'{module}' has no '{module}.{part}'"
    down, up = parts[DOWN], parts[UP]
    factors_fit = up.ndim == down.ndim and up.shape[1] == down.shape[0] and up.shape[2:] in ((), (1, 1))
    if down.ndim not in (2, 4) or not factors_fit:
        return (f"'{module}': lora_down {list(down.shape)} and lora_up {list(up.shape)} are not the two factors "
                "of one Linear or Conv2d LoRA")
    if ALPHA in parts and parts[ALPHA].size != 1:
        return f"'{module}.{ALPHA}' has shape {list(parts[ALPHA].shape)}, expected a single number"
    return None
