"""Kohya-format LoRA for SDXL (sd-scripts' `networks.lora`), as MindSpore cells.

`LoRANetwork.apply_to` replaces each target Linear / Conv2d cell of the UNet and both text encoders by
a `LoRAModule` that keeps the original cell inside and computes

    org(x) + up(down(x)) * multiplier * alpha / rank

Cells are swapped in place rather than hooked, so the models compile in graph mode unchanged.
Targets and names follow sd-scripts exactly, so files move between it and this trainer as they are:
  UNet  `lora_unet_<SGM path>`: every Linear in the transformer blocks; with `conv_dim`, also the
        ResBlocks (3x3 convs at conv rank, emb_layers / skip_connection at the linear rank) and the
        down/upsampling convs.
  TEs   `lora_te1_` / `lora_te2_<HF CLIP path>`: q/k/v/out_proj and fc1/fc2 of every layer.
"""

import json
import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor, mint, nn, ops

from library import backend
from library.errors import UserError
from library.layers import Conv2d, Linear, WeightedCell
from library.lora_metadata import finalize_lora_metadata
from library.safetensors_io import save_safetensors
from library.sdxl_unet import Downsample, ResBlock, SDXLUNet, SpatialTransformer, Upsample
from networks.lora_weights import (
    ALPHA,
    DOWN,
    UP,
    ModuleWeights,
    diffusers_lora_names,
    kohya_state,
    lora_module_name,
    parse_lora_tensors,
    read_lora_file,
)

NETWORK_MODULE = "networks.lora"
UNET_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIXES = ("lora_te1_", "lora_te2_")

UNET_TARGET_BLOCKS = (SpatialTransformer,)
UNET_CONV_TARGET_BLOCKS = (ResBlock, Downsample, Upsample)
# mindone.transformers' CLIP cells, matched by name as sd-scripts does (attention variants included).
TEXT_ENCODER_TARGET_BLOCKS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")

# sd-scripts' SDXL blocks for block_dims: 0 time/label embedding, 1-9 input_blocks, 10-12 middle_block,
# 13-21 output_blocks, 22 out.
SDXL_NUM_BLOCKS = 23

DEFAULT_NETWORK_DIM = 4
DEFAULT_NETWORK_ALPHA = 1.0
DEFAULT_CONV_ALPHA = 1.0


# ---- The LoRA cell --------------------------------------------------------------------------------


class LoRAWeight(WeightedCell):
    """One LoRA matrix, held as `weight` so parameter paths read `lora_down.weight` as in Kohya files."""

    def __init__(self, value: np.ndarray):
        super().__init__()
        self.weight = Parameter(Tensor(value.astype(np.float32)), name="weight")


def _cast(weight, like):
    return weight if weight.dtype == like.dtype else weight.astype(like.dtype)


def _float32_array(param: Parameter) -> np.ndarray:
    return (param if param.dtype == ms.float32 else param.astype(ms.float32)).asnumpy()


class LoRAModule(nn.Cell):
    """Wraps a Linear or Conv2d cell: org(x) + up(down(x)) * multiplier * alpha / rank.

    For a convolution, `down` is a convolution with the original kernel, stride and padding and `up` a
    1x1 convolution. `down` starts Kaiming-uniform (a = sqrt 5) and `up` at zero, so a fresh module
    changes nothing. `multiplier` is a 0-d Parameter shared by the whole network: compiled graphs read
    it at run time. Dropouts act in training only.
    """

    def __init__(self, lora_name: str, org_module: nn.Cell, multiplier: Parameter, lora_dim: int,
                 alpha: Optional[float] = None, dropout: Optional[float] = None,
                 rank_dropout: Optional[float] = None, module_dropout: Optional[float] = None):
        super().__init__()
        self.lora_name = lora_name
        self.lora_dim = lora_dim
        # alpha 0 or absent means no scaling, as in sd-scripts.
        self.alpha = float(lora_dim if alpha is None or alpha == 0 else alpha)
        self.scale = self.alpha / lora_dim
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout

        base_shape = tuple(org_module.weight.shape)
        out_dim, in_dim = base_shape[:2]
        kernel = base_shape[2:]
        self.is_conv = len(base_shape) == 4
        self.stride = org_module.stride if self.is_conv else 1
        self.padding = org_module.padding if self.is_conv else 0

        # Kaiming-uniform with a = sqrt(5): bound = sqrt(6 / ((1 + a^2) fan_in)) = 1 / sqrt(fan_in).
        fan_in = in_dim * int(np.prod(kernel))
        down = np.random.uniform(-1.0, 1.0, (lora_dim, in_dim) + kernel) / math.sqrt(fan_in)
        up = np.zeros((out_dim, lora_dim) + (1,) * len(kernel))
        attach(self, "org_module", org_module)
        attach(self, "lora_down", LoRAWeight(down))
        attach(self, "lora_up", LoRAWeight(up))
        attach(self, "multiplier", multiplier)
        self.lora_down.weight.name = f"{lora_name}.{DOWN}"
        self.lora_up.weight.name = f"{lora_name}.{UP}"

    @property
    def base_weight(self) -> Parameter:
        return self.org_module.weight

    def construct(self, x, weights=None):
        # A text encoder's own layers take no `weights`; only a compiled unit of our UNet passes them.
        out = self.org_module(x) if weights is None else self.org_module(x, weights)
        down = self.lora_down.own_or_passed(self.lora_down.weight, 0, weights)
        up = self.lora_up.own_or_passed(self.lora_up.weight, 0, weights)
        lx = self._project(x, down, self.stride, self.padding)
        scale = self.multiplier.astype(lx.dtype) * self.scale
        if self.training:
            lx, scale = self._training_dropouts(lx, scale)
        lx = self._project(lx, up, 1, 0)
        return out + lx * scale

    def _project(self, x, weight, stride, padding):
        if self.is_conv:
            return backend.conv2d(x, _cast(weight, x), None, stride, padding)
        return backend.linear(x, _cast(weight, x))

    def _training_dropouts(self, lx, scale):
        if self.dropout is not None:
            lx = backend.dropout(lx, self.dropout, True)
        if self.rank_dropout is not None:
            # Dropout of a ones mask keeps each rank with probability 1 - p and scales it by 1 / (1 - p):
            # sd-scripts' rank dropout, which treats the kept ranks as the whole rank.
            mask = backend.dropout(ops.ones((lx.shape[0], self.lora_dim), lx.dtype), self.rank_dropout, True)
            if lx.ndim == 3:
                mask = mask[:, None, :]
            elif lx.ndim == 4:
                mask = mask[:, :, None, None]
            lx = lx * mask
        if self.module_dropout is not None:
            # Arithmetic rather than an early return, so the graph has no data-dependent branch.
            keep = backend.dropout(ops.ones((1,), lx.dtype), self.module_dropout, True) > 0
            scale = scale * keep.astype(lx.dtype)
        return lx, scale

    def delta_weight(self):
        """alpha / rank * up @ down in the base weight's layout, float32 (no multiplier)."""
        down = self.lora_down.weight.astype(ms.float32)
        up = self.lora_up.weight.astype(ms.float32)
        product = mint.matmul(up.reshape(up.shape[0], self.lora_dim), down.reshape(self.lora_dim, -1))
        return product.reshape(tuple(self.base_weight.shape)) * self.scale


def attach(parent: nn.Cell, key: str, child):
    """Set `child` (a cell or Parameter) as `parent.key`, or item `key` of a SequentialCell/CellList.

    MindSpore renames every parameter of an attached cell to `key.<its path>`, which would give
    hundreds of parameters the same name (`to_q.lora_down.weight`); their names are kept instead.
    """
    params = [child] if isinstance(child, Parameter) else list(child.get_parameters())
    names = [param.name for param in params]
    if isinstance(parent, (nn.SequentialCell, nn.CellList)):
        parent[int(key)] = child
    else:
        setattr(parent, key, child)
    for param, name in zip(params, names):
        param.name = name


def _child(parent: nn.Cell, key: str) -> nn.Cell:
    if isinstance(parent, (nn.SequentialCell, nn.CellList)):
        return parent[int(key)]
    return getattr(parent, key)


# ---- Which cells are adapted ----------------------------------------------------------------------


@dataclass(frozen=True)
class LoRATarget:
    lora_name: str
    root: str  # "te1", "te2" or "unet"
    path: str  # module path inside the root cell
    cell: nn.Cell
    in_conv_block: bool  # adapted only with conv_dim (or a file that adapts it)

    @property
    def is_unet(self) -> bool:
        return self.root == "unet"

    @property
    def is_conv3x3(self) -> bool:
        return len(self.cell.weight.shape) == 4 and tuple(self.cell.weight.shape[2:]) != (1, 1)


def _is_block(cell: nn.Cell, block_types) -> bool:
    """block_types: cell classes, or class names (for mindone's CLIP cells)."""
    return any(type(cell).__name__ == t if isinstance(t, str) else isinstance(cell, t) for t in block_types)


def _find_targets(root_name: str, root: nn.Cell, prefix: str, block_types, conv_block_types=()) -> List[LoRATarget]:
    targets = []
    for block_path, block in root.cells_and_names():
        if isinstance(block, LoRAModule):
            raise ValueError(f"a LoRA network is already applied to this {root_name} model")
        in_conv_block = _is_block(block, conv_block_types)
        if not (in_conv_block or _is_block(block, block_types)):
            continue
        for child_path, child in block.cells_and_names():
            if isinstance(child, (Linear, Conv2d, nn.Dense)):
                path = f"{block_path}.{child_path}"
                targets.append(LoRATarget(lora_module_name(prefix, path), root_name, path, child, in_conv_block))
    return targets


def lora_targets(text_encoders: Sequence[nn.Cell], unet: Optional[nn.Cell]) -> List[LoRATarget]:
    """Every cell sd-scripts' LoRA can adapt in these models (conv blocks included), text encoders first."""
    targets = []
    for index, text_encoder in enumerate(text_encoders):
        root = f"te{index + 1}"
        targets += _find_targets(root, text_encoder, TEXT_ENCODER_PREFIXES[index], TEXT_ENCODER_TARGET_BLOCKS)
    if unet is not None:
        targets += _find_targets("unet", unet, UNET_PREFIX, UNET_TARGET_BLOCKS, UNET_CONV_TARGET_BLOCKS)
    return targets


def sdxl_block_index(lora_name: str) -> int:
    """sd-scripts' SDXL block number of a UNet LoRA module (the index into block_dims)."""
    parts = lora_name[len(UNET_PREFIX):].split("_")
    first = {"input": 1, "middle": 10, "output": 13}.get(parts[0])
    if first is None:
        raise ValueError(f"{lora_name} is not in input_blocks, middle_block or output_blocks")
    return first + int(parts[2])


# ---- --network_args -------------------------------------------------------------------------------

SUPPORTED_NETWORK_ARGS = (
    "conv_dim", "conv_alpha", "dropout", "rank_dropout", "module_dropout",
    "block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas",
    "loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio",
)
# Understood by sd-scripts' networks.lora but not implemented here.
NOT_YET_SUPPORTED_NETWORK_ARGS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold")
# Decided by the file with --dim_from_weights.
STRUCTURE_NETWORK_ARGS = ("conv_dim", "conv_alpha", "block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas")


@dataclass
class NetworkArgs:
    conv_dim: Optional[int] = None
    conv_alpha: Optional[float] = None
    rank_dropout: Optional[float] = None
    module_dropout: Optional[float] = None
    block_dims: Optional[List[int]] = None
    block_alphas: Optional[List[float]] = None
    conv_block_dims: Optional[List[int]] = None
    conv_block_alphas: Optional[List[float]] = None
    loraplus_lr_ratio: Optional[float] = None
    loraplus_unet_lr_ratio: Optional[float] = None
    loraplus_text_encoder_lr_ratio: Optional[float] = None


def _number(kwargs, key, kind):
    value = kwargs.get(key)
    if value is None:
        return None
    try:
        return kind(value)
    except ValueError:
        raise UserError(f"--network_args: {key}={value} is not a valid {kind.__name__}") from None


def _per_block(kwargs, key, kind):
    value = kwargs.get(key)
    if value is None:
        return None
    try:
        values = [kind(item) for item in str(value).split(",")]
    except ValueError:
        raise UserError(f"--network_args: {key}={value} must be {SDXL_NUM_BLOCKS} comma-separated numbers") from None
    if len(values) != SDXL_NUM_BLOCKS:
        raise UserError(f"--network_args: {key} must have {SDXL_NUM_BLOCKS} values for SDXL, got {len(values)}")
    return values


def parse_network_args(kwargs: Dict, network_dim: int, network_alpha: float) -> NetworkArgs:
    """`--network_args` key=value pairs (values as strings or numbers) -> NetworkArgs, as sd-scripts reads them.

    `dropout` is accepted and ignored: sd-scripts' trainer adds it for LyCORIS while LoRA takes
    --network_dropout as `neuron_dropout`.
    """
    for key in kwargs:
        if key in NOT_YET_SUPPORTED_NETWORK_ARGS:
            raise UserError(f"--network_args: '{key}' (block-wise learning rates) is not supported yet")
        if key not in SUPPORTED_NETWORK_ARGS:
            raise UserError(f"--network_args: unknown key '{key}' for {NETWORK_MODULE} "
                            f"(supported: {', '.join(SUPPORTED_NETWORK_ARGS)})")
    args = NetworkArgs(
        conv_dim=_number(kwargs, "conv_dim", int),
        conv_alpha=_number(kwargs, "conv_alpha", float),
        rank_dropout=_number(kwargs, "rank_dropout", float),
        module_dropout=_number(kwargs, "module_dropout", float),
        block_dims=_per_block(kwargs, "block_dims", int),
        block_alphas=_per_block(kwargs, "block_alphas", float),
        conv_block_dims=_per_block(kwargs, "conv_block_dims", int),
        conv_block_alphas=_per_block(kwargs, "conv_block_alphas", float),
        loraplus_lr_ratio=_number(kwargs, "loraplus_lr_ratio", float),
        loraplus_unet_lr_ratio=_number(kwargs, "loraplus_unet_lr_ratio", float),
        loraplus_text_encoder_lr_ratio=_number(kwargs, "loraplus_text_encoder_lr_ratio", float),
    )
    if args.conv_dim is not None and args.conv_alpha is None:
        args.conv_alpha = DEFAULT_CONV_ALPHA
    # sd-scripts ignores these without the key they refine; here that would be a silent no-op.
    if args.block_dims is None:
        for key in ("block_alphas", "conv_block_dims", "conv_block_alphas"):
            if key in kwargs:
                raise UserError(f"--network_args: {key} needs block_dims as well")
        if args.conv_alpha is not None and args.conv_dim is None:
            raise UserError("--network_args: conv_alpha needs conv_dim as well")
        return args
    if args.block_alphas is None:
        args.block_alphas = [network_alpha] * SDXL_NUM_BLOCKS
    if args.conv_block_dims is None and args.conv_dim is not None:
        args.conv_block_dims = [args.conv_dim] * SDXL_NUM_BLOCKS
        args.conv_block_alphas = [args.conv_alpha] * SDXL_NUM_BLOCKS
    if args.conv_block_dims is not None and args.conv_block_alphas is None:
        args.conv_block_alphas = [args.conv_alpha or DEFAULT_CONV_ALPHA] * SDXL_NUM_BLOCKS
    return args


# ---- The network ----------------------------------------------------------------------------------


class LoRANetwork:
    """The LoRA modules for a UNet and its text encoders, and everything done with them as a whole.

    Ranks come from `lora_dim`/`alpha` (`args.conv_dim`/`args.conv_alpha` for 3x3 convs), from the
    SDXL per-block lists in `args`, or for a network read from a file from `modules_dim`/`modules_alpha`.
    A module of rank 0 is not created.
    """

    def __init__(self, text_encoders: Sequence[nn.Cell], unet: SDXLUNet, multiplier: float = 1.0,
                 lora_dim: int = DEFAULT_NETWORK_DIM, alpha: float = DEFAULT_NETWORK_ALPHA,
                 dropout: Optional[float] = None, args: Optional[NetworkArgs] = None,
                 modules_dim: Optional[Dict[str, int]] = None, modules_alpha: Optional[Dict[str, float]] = None,
                 given_args: Optional[Dict] = None):
        """`given_args`: network_dim, network_alpha, neuron_dropout and network_args exactly as the
        trainer passed them, recorded for the ss_* metadata."""
        args = args or NetworkArgs()
        self.args = args
        self.given_args = given_args or {}
        self.unet_config = unet.config
        self.multiplier_parameter = Parameter(Tensor(float(multiplier), ms.float32), name="lora_multiplier",
                                              requires_grad=False)
        include_conv = modules_dim is not None or args.conv_dim is not None or args.conv_block_dims is not None
        self.all_targets = lora_targets(text_encoders, unet)

        self.text_encoder_loras: List[LoRAModule] = []
        self.unet_loras: List[LoRAModule] = []
        self.placements: Dict[str, LoRATarget] = {}
        for target in self.all_targets:
            if target.in_conv_block and not include_conv:
                continue
            dim, module_alpha = self._rank_and_alpha(target, lora_dim, alpha, args, modules_dim, modules_alpha)
            if not dim:
                continue
            lora = LoRAModule(target.lora_name, target.cell, self.multiplier_parameter, dim, module_alpha,
                              dropout=dropout, rank_dropout=args.rank_dropout, module_dropout=args.module_dropout)
            (self.unet_loras if target.is_unet else self.text_encoder_loras).append(lora)
            self.placements[target.lora_name] = target
        self.applied = False
        self.merged_multiplier: Optional[float] = None

    @staticmethod
    def _rank_and_alpha(target, lora_dim, alpha, args, modules_dim, modules_alpha):
        name = target.lora_name
        if modules_dim is not None:
            return modules_dim.get(name), (modules_alpha or {}).get(name)
        if target.is_unet and args.block_dims is not None:
            block = sdxl_block_index(name)
            if not target.is_conv3x3:
                return args.block_dims[block], args.block_alphas[block]
            if args.conv_block_dims is not None:
                return args.conv_block_dims[block], args.conv_block_alphas[block]
            return None, None
        if not target.is_conv3x3:
            return lora_dim, alpha
        return args.conv_dim, args.conv_alpha

    @property
    def loras(self) -> List[LoRAModule]:
        return self.text_encoder_loras + self.unet_loras

    # ---- Applying to the models

    def apply_to(self, text_encoders, unet, apply_text_encoder: bool = True, apply_unet: bool = True) -> None:
        """Swap each target cell for its LoRA cell in place; parts not applied are dropped from the network."""
        if self.applied:
            raise ValueError("this LoRA network is already applied")
        if not apply_text_encoder:
            self.text_encoder_loras = []
        if not apply_unet:
            self.unet_loras = []
        roots = {f"te{index + 1}": te for index, te in enumerate(_as_list(text_encoders))}
        roots["unet"] = unet
        cells = {root: dict(cell.cells_and_names()) for root, cell in roots.items()}
        for lora in self.loras:
            target = self.placements[lora.lora_name]
            parent_path, _, key = target.path.rpartition(".")
            parent = cells[target.root][parent_path]
            if _child(parent, key) is not target.cell:
                raise ValueError(f"apply_to: {target.root} '{target.path}' is not the cell this network was made for")
            attach(parent, key, lora)
        self.applied = True

    def set_multiplier(self, multiplier: float) -> None:
        # ops.assign, not set_data: compiled graphs keep reading the old data after set_data.
        ops.assign(self.multiplier_parameter, Tensor(float(multiplier), ms.float32))

    @property
    def multiplier(self) -> float:
        return float(self.multiplier_parameter.asnumpy())

    def set_train(self, mode: bool = True) -> None:
        """Dropouts act only in training (sd-scripts calls network.train() at each epoch start)."""
        for lora in self.loras:
            lora.set_train(mode)

    def enable_gradient_checkpointing(self) -> None:
        """Nothing to do: LoRA modules are recomputed with the blocks that contain them (as sd-scripts)."""

    def is_mergeable(self) -> bool:
        return True

    # ---- Training

    def adapter_params(self) -> List[Parameter]:
        """The trainable parameters: every lora_down and lora_up weight, text encoders first."""
        return self._weights(self.loras, DOWN, UP)

    def prepare_optimizer_params(self, text_encoder_lr, unet_lr, default_lr=None):
        """(param groups [{"params": [...], "lr": float}], descriptions), as sd-scripts groups them.

        With LoRA+, each part's lora_up weights form a second group at lr * ratio ("... plus").
        A group whose learning rate is None or 0 is left out (it would not train).
        """
        groups, descriptions = [], []
        parts = (
            ("textencoder", self.text_encoder_loras, text_encoder_lr,
             self.args.loraplus_text_encoder_lr_ratio or self.args.loraplus_lr_ratio),
            ("unet", self.unet_loras, unet_lr, self.args.loraplus_unet_lr_ratio or self.args.loraplus_lr_ratio),
        )
        for description, loras, lr, ratio in parts:
            lr = default_lr if lr is None else lr
            if ratio is None:
                candidates = [(self._weights(loras, DOWN, UP), lr, description)]
            else:
                plus_lr = None if lr is None else lr * ratio
                candidates = [(self._weights(loras, DOWN), lr, description),
                              (self._weights(loras, UP), plus_lr, description + " plus")]
            for params, group_lr, group_description in candidates:
                if params and group_lr:
                    groups.append({"params": params, "lr": group_lr})
                    descriptions.append(group_description)
        return groups, descriptions

    @staticmethod
    def _weights(loras, *parts) -> List[Parameter]:
        chosen = {DOWN: lambda lora: lora.lora_down.weight, UP: lambda lora: lora.lora_up.weight}
        return [chosen[part](lora) for lora in loras for part in parts]

    def apply_max_norm_regularization(self, max_norm_value: float, device=None):
        """Scale down every module whose weight delta (alpha / rank * up @ down) has a Frobenius norm
        above `max_norm_value`, splitting the factor evenly between up and down.

        Returns (modules scaled, mean norm after scaling, max norm after scaling), as sd-scripts.
        `device` is accepted for sd-scripts' call signature; the work stays where the weights are.
        """
        scaled_norms, ratios = [], []
        for lora in self.loras:
            norm = ops.sqrt((lora.delta_weight() ** 2).sum())
            # sd-scripts' clamp keeps tiny norms from dividing by ~0; ratio is 1 unless norm > max.
            ratio = ops.minimum(max_norm_value / ops.maximum(norm, max_norm_value / 2), 1.0)
            root = ops.sqrt(ratio)
            for param in (lora.lora_up.weight, lora.lora_down.weight):
                ops.assign(param, (param * root.astype(param.dtype)).astype(param.dtype))
            scaled_norms.append(norm * ratio)
            ratios.append(ratio)
        if not scaled_norms:
            return 0, 0.0, 0.0
        norms = ops.stack(scaled_norms).asnumpy()
        keys_scaled = int((ops.stack(ratios) < 1.0).sum().asnumpy())
        return keys_scaled, float(norms.mean()), float(norms.max())

    # ---- Weights and files

    def state_dict(self) -> Dict[str, np.ndarray]:
        """{Kohya tensor name: float32 array}, alpha as 0-d arrays."""
        modules = {
            lora.lora_name: ModuleWeights(_float32_array(lora.lora_down.weight), _float32_array(lora.lora_up.weight),
                                          lora.alpha)
            for lora in self.loras
        }
        return kohya_state(modules)

    def load_state_dict(self, weights: Dict[str, np.ndarray], source: str = "LoRA weights",
                        list_unmatched: bool = False) -> List[str]:
        """Load Kohya tensors (SGM or diffusers UNet names) into this network's modules.

        Every tensor must belong to a module of this network with its rank and alpha; returns the
        names of this network's modules the weights do not cover (they keep their values).
        """
        by_name = {lora.lora_name: lora for lora in self.loras}
        shapes = {name: tuple(lora.base_weight.shape) for name, lora in by_name.items()}
        aliases = diffusers_lora_names((t.path for t in self.all_targets if t.is_unet), self.unet_config)
        modules = parse_lora_tensors(weights, source, shapes, aliases, list_unmatched, owner="this network")
        problems = []
        for name, module in modules.items():
            lora = by_name[name]
            if module.rank != lora.lora_dim:
                problems.append(f"'{name}' has rank {module.rank}, this network {lora.lora_dim}")
            # A bf16 file holds alpha to about 3 significant digits.
            elif not math.isclose(module.alpha, lora.alpha, rel_tol=1e-2):
                problems.append(f"'{name}.{ALPHA}' is {module.alpha:g}, this network's alpha is {lora.alpha:g}")
        if problems:
            raise UserError(f"{source}: the file's ranks or alphas differ from this network's "
                            f"(--network_dim/--network_alpha/--network_args or --dim_from_weights): {problems[0]}"
                            + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
        for name, module in modules.items():
            lora = by_name[name]
            for param, value in ((lora.lora_down.weight, module.down), (lora.lora_up.weight, module.up)):
                ops.assign(param, Tensor(np.ascontiguousarray(value), dtype=param.dtype))
        return [name for name in by_name if name not in modules]

    def load_weights(self, file, list_unmatched: bool = False) -> List[str]:
        """Load a Kohya .safetensors file (--network_weights); returns this network's modules it lacks."""
        return self.load_state_dict(read_lora_file(file), os.fspath(file), list_unmatched)

    def save_weights(self, file, dtype=None, metadata: Optional[Dict] = None, no_metadata: bool = False) -> None:
        """Write the Kohya file atomically: tensors in `dtype` (np.float16, ml_dtypes.bfloat16 or
        np.float32; None keeps float32), `metadata` finalised with the sshs_* hashes as sd-scripts does."""
        if not os.fspath(file).lower().endswith(".safetensors"):
            raise UserError(f"{file}: LoRA files are saved as .safetensors only (--save_model_as safetensors)")
        state = self.state_dict()
        if dtype is not None:
            state = {name: value.astype(dtype) for name, value in state.items()}
        save_safetensors(state, file, finalize_lora_metadata(state, metadata or {}, no_metadata))

    # ---- Merging into the base weights (inference)

    def merge_to(self, text_encoders=None, unet=None, weights_sd: Optional[Dict[str, np.ndarray]] = None,
                 dtype=None, device=None) -> None:
        """Add multiplier * alpha / rank * up @ down to each adapted base weight.

        `weights_sd` (as returned by create_network_from_weights) is loaded first when given. The models
        and `dtype`/`device` are accepted for sd-scripts' call signature: the network already holds its
        cells, and merged weights keep their parameter's dtype.
        """
        if self.applied:
            raise ValueError("merge_to: this network is applied (apply_to); merging too would add it twice")
        if self.merged_multiplier is not None:
            raise ValueError("merge_to: already merged; unmerge first")
        if weights_sd is not None:
            self.load_state_dict(weights_sd)
        self._add_deltas(self.multiplier)
        self.merged_multiplier = self.multiplier

    def unmerge(self) -> None:
        """Subtract what merge_to added (exact up to float rounding of the base weights)."""
        if self.merged_multiplier is None:
            raise ValueError("unmerge: nothing is merged")
        self._add_deltas(-self.merged_multiplier)
        self.merged_multiplier = None

    def _add_deltas(self, multiplier: float) -> None:
        for lora in self.loras:
            weight = lora.base_weight
            merged = weight.astype(ms.float32) + lora.delta_weight() * multiplier
            ops.assign(weight, merged.astype(weight.dtype))

    # ---- Metadata

    def metadata(self) -> Dict[str, str]:
        """The network's ss_* entries, as sd-scripts writes them (values as given, "None" when unset)."""
        given = self.given_args
        entries = {
            "ss_network_module": NETWORK_MODULE,
            "ss_network_dim": str(given.get("network_dim")),
            "ss_network_alpha": str(given.get("network_alpha")),
            "ss_network_dropout": str(given.get("neuron_dropout")),
            "ss_base_model_version": "sdxl_base_v1-0",
            "ss_v2": "False",
        }
        network_args = given.get("network_args", {})
        # sd-scripts' trainer adds "dropout" (a float or None) to the network args itself; the entry is
        # written only when the user gave --network_args, whose values are strings.
        if any(key != "dropout" or isinstance(value, str) for key, value in network_args.items()):
            entries["ss_network_args"] = json.dumps(network_args)
        return entries


# ---- Entry points (sd-scripts' network module interface) ------------------------------------------


def _as_list(text_encoders) -> List[nn.Cell]:
    if text_encoders is None:
        return []
    return list(text_encoders) if isinstance(text_encoders, (list, tuple)) else [text_encoders]


def create_network(multiplier: float, network_dim: Optional[int], network_alpha: Optional[float], vae,
                   text_encoders, unet, neuron_dropout: Optional[float] = None, **kwargs) -> LoRANetwork:
    """A fresh LoRA network for `unet` and `text_encoders` (`vae` is unused, as in sd-scripts).

    `kwargs` are the --network_args key=value pairs; an unknown key raises UserError naming it.
    """
    dim = DEFAULT_NETWORK_DIM if network_dim is None else int(network_dim)
    alpha = DEFAULT_NETWORK_ALPHA if network_alpha is None else float(network_alpha)
    args = parse_network_args(kwargs, dim, alpha)
    given_dropout = _number(kwargs, "dropout", float)
    if given_dropout is not None and given_dropout != neuron_dropout:
        raise UserError(f"--network_args: dropout={kwargs['dropout']} is not read by {NETWORK_MODULE}; "
                        "use --network_dropout")
    given = {"network_dim": network_dim, "network_alpha": network_alpha, "neuron_dropout": neuron_dropout,
             "network_args": dict(kwargs)}
    return LoRANetwork(_as_list(text_encoders), unet, multiplier, dim, alpha, neuron_dropout, args, given_args=given)


def create_network_from_weights(multiplier: float, file, vae, text_encoders, unet,
                                weights_sd: Optional[Dict[str, np.ndarray]] = None, for_inference: bool = False,
                                list_unmatched: bool = False, **kwargs):
    """A network shaped like a Kohya LoRA file: the modules, ranks and alphas it holds.

    Returns (network, weights_sd) with `weights_sd` the file's tensors as float32 under SGM names;
    the weights are not loaded yet (merge_to or apply_to + load_state_dict does that). Any tensor that
    does not fit the model raises UserError naming it. `for_inference` is accepted for sd-scripts'
    signature: the same module serves both. `kwargs` (--network_args) may set dropouts and LoRA+ ratios.
    """
    text_encoders = _as_list(text_encoders)
    source = os.fspath(file) if file is not None else "LoRA weights"
    if weights_sd is None:
        weights_sd = read_lora_file(file)
    for key in kwargs:
        if key in STRUCTURE_NETWORK_ARGS:
            raise UserError(f"--network_args: {key} cannot be used with --dim_from_weights (the file decides it)")
    args = parse_network_args(kwargs, DEFAULT_NETWORK_DIM, DEFAULT_NETWORK_ALPHA)

    all_targets = lora_targets(text_encoders, unet)
    shapes = {t.lora_name: tuple(t.cell.weight.shape) for t in all_targets}
    aliases = diffusers_lora_names((t.path for t in all_targets if t.is_unet), unet.config)
    modules = parse_lora_tensors(weights_sd, source, shapes, aliases, list_unmatched)
    network = LoRANetwork(text_encoders, unet, multiplier, args=args,
                          modules_dim={name: m.rank for name, m in modules.items()},
                          modules_alpha={name: m.alpha for name, m in modules.items()},
                          given_args={"network_args": dict(kwargs)})
    return network, kohya_state(modules)
