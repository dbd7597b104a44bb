"""Print the statistics of every tensor of a LoRA file, as sd-scripts' networks/check_lora_weights.py, and
flag modules that cannot work: dead (lora_up all zero, so the module changes nothing) or exploded
(non-finite values, or a delta far larger than the file's other modules).

    python networks/check_lora_weights.py my_lora.safetensors [-s]

Each line is `name,shape,mean(|x|),min(|x|)` as in sd-scripts; then one line per Kohya module with
the Frobenius norm of its delta alpha / rank * up @ down. The exit code is 1 when a module is flagged.
"""

import argparse
import math
import os
import sys
from dataclasses import dataclass
from typing import List, Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.errors import UserError, exit_on_user_error  # noqa: E402
from library.safetensors_io import open_safetensors, refuse_pickle  # noqa: E402
from networks.lora_math import delta_norm  # noqa: E402
from networks.lora_weights import ALPHA, DOWN, UP  # noqa: E402

# sd-scripts counts a tensor as a LoRA weight when its name contains one of these.
LORA_TENSOR_MARKERS = ("lora_up", "lora_down", "lora_A", "lora_B", "oft_")
# A delta this many times the median of the file's live modules is flagged as exploded.
EXPLODED_NORM_FACTOR = 100.0


def tensor_line(name: str, value: np.ndarray) -> str:
    """sd-scripts' line: name, shape with '-' between sizes, mean and min of |value|."""
    magnitude = np.abs(value.astype(np.float32))
    shape = str(tuple(value.shape)).replace(", ", "-")
    return f"{name},{shape},{magnitude.mean()},{magnitude.min()}"


@dataclass
class ModuleHealth:
    name: str
    norm: float  # Frobenius norm of alpha / rank * up @ down (nan when a tensor is not finite)
    dead: bool
    finite: bool
    exploded: bool = False


def module_health(name: str, down: np.ndarray, up: np.ndarray, alpha: Optional[float]) -> ModuleHealth:
    rank = down.shape[0]
    scale = (rank if alpha is None else alpha) / rank
    finite = bool(np.isfinite(down).all() and np.isfinite(up).all() and math.isfinite(scale))
    norm = delta_norm(down, up, scale) if finite else float("nan")
    return ModuleHealth(name, norm, dead=finite and not np.any(up), finite=finite)


def flag_exploded(modules: List[ModuleHealth]) -> None:
    """Mark modules whose delta norm is EXPLODED_NORM_FACTOR times the median of the live modules'."""
    live = [m.norm for m in modules if m.finite and not m.dead]
    if not live:
        return
    limit = EXPLODED_NORM_FACTOR * float(np.median(live))
    for module in modules:
        module.exploded = not module.finite or (not module.dead and module.norm > limit)


@dataclass
class WeightsReport:
    lines: List[str]  # sd-scripts' lines, then each Kohya module's delta norm
    modules: List[ModuleHealth]

    @property
    def flagged(self) -> List[str]:
        return ([f"dead: {m.name} (lora_up is all zero: the module changes nothing)" for m in self.modules if m.dead]
                + [f"exploded: {m.name} " + ("(non-finite values)" if not m.finite else
                                             f"(delta norm {m.norm:.4g}, over {EXPLODED_NORM_FACTOR:g}x the median)")
                   for m in self.modules if m.exploded])


def check(path: str, show_all_keys: bool = False) -> WeightsReport:
    """Reads the file one tensor at a time; a module's tensors are kept only until its lora_up is read
    (sorted names put <module>.alpha and .lora_down before .lora_up)."""
    refuse_pickle(path)
    with open_safetensors(path) as reader:
        keys = sorted(reader.keys())
        lora_keys = [key for key in keys if any(marker in key for marker in LORA_TENSOR_MARKERS)]
        if not lora_keys:
            raise UserError(f"{path}: no LoRA tensors in this file (is it a LoRA?)")
        lines = [f"number of LoRA modules: {len(lora_keys)}"]
        shown = lora_keys + ([key for key in keys if key not in lora_keys] if show_all_keys else [])
        if show_all_keys:
            lines.append(f"number of all modules: {len(shown)}")
        lines += [tensor_line(key, reader.read_float32(key)) for key in shown]

        modules, pending = [], {}
        for key in keys:
            module, _, part = key.partition(".")
            if part not in (DOWN, UP, ALPHA):
                continue
            pending.setdefault(module, {})[part] = reader.read_float32(key)
            parts = pending[module]
            if DOWN in parts and UP in parts:
                alpha = float(parts[ALPHA].reshape(-1)[0]) if ALPHA in parts else None
                modules.append(module_health(module, parts[DOWN], parts[UP], alpha))
                del pending[module]
    flag_exploded(modules)
    lines += [f"{m.name}: delta norm {m.norm:.6g}" for m in modules]
    return WeightsReport(lines, modules)


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", type=str, help="LoRA .safetensors file to check")
    parser.add_argument("-s", "--show_all_keys", action="store_true", help="show all keys, not only LoRA weights")
    return parser


def main(argv=None) -> None:
    args = setup_parser().parse_args(argv)
    with exit_on_user_error():
        report = check(args.file, args.show_all_keys)
    print("\n".join(report.lines + report.flagged))
    if report.flagged:
        sys.exit(1)


if __name__ == "__main__":
    main()
