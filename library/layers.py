"""Parameter-holding building blocks shared by the UNet and the VAE, named as in PyTorch (weight, bias).

Weights may be stored in a lower precision than the activations (frozen base weights in fp16/bf16 save
half the memory); each layer casts its weight to the input's dtype before computing.

A layer can also compute with weights passed in from outside: `weights` is then the flat weight tuple
of a separately compiled unit (library/blockwise.py) and the layer's own weights start at its `slot`.
Blocks of the same structure thereby share one compiled graph, each run with its own weights.

`freeze` marks a model's layers frozen: their weights enter the graph through `stop_gradient`, so no
weight-gradient kernel is ever built for them, whatever the graph optimiser's dead-code elimination
does (on the mid-size SDXL step it made no measured difference: 6.66 vs 6.68 GiB, same s/step).
"""

import math
from contextlib import contextmanager
from typing import List

import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor, mint, nn, ops

from library import backend


_init_state = {"rng": np.random.default_rng(0), "skip": False}


@contextmanager
def weight_init(seed: int = 0, skip: bool = False):
    """Seed the random initialisation of layers built inside; `skip=True` builds zeros (a checkpoint follows)."""
    saved = dict(_init_state)
    _init_state.update(rng=np.random.default_rng(seed), skip=skip)
    try:
        yield
    finally:
        _init_state.update(saved)


def _uniform(shape, bound):
    if _init_state["skip"]:
        return Tensor(np.zeros(shape, np.float32))
    return Tensor(_init_state["rng"].uniform(-bound, bound, size=shape).astype(np.float32))


def _cast(weight, like):
    return weight if weight.dtype == like.dtype else weight.astype(like.dtype)


class WeightedCell(nn.Cell):
    """A cell whose weights (`weight_params()`, in a fixed order) a compiled unit may pass in from outside."""

    slot = 0

    def weight_params(self):
        return [param for param in (getattr(self, "weight", None), getattr(self, "bias", None)) if param is not None]

    def own_or_passed(self, param, index, weights):
        """Parameter `param`, the layer's index-th weight, or its entry of a unit's flat `weights` tuple."""
        return param if weights is None else weights[self.slot + index]

    def passed_weights(self) -> List[Tensor]:
        """The tensors a compiled unit receives for `weight_params()`: their `data`, sharing the Parameters'
        memory (`value()` copies: +10 GiB at full size, measured), so they see the optimizer's updates."""
        return [param.data for param in self.weight_params()]


class FreezableCell(WeightedCell):
    """A layer whose parameters can be frozen; `operand(p, i, x, weights)` is its weight p (the i-th) as the
    computation on input x uses it."""

    frozen = False

    def operand(self, param, index, like, weights):
        value = _cast(self.own_or_passed(param, index, weights), like)
        return ops.stop_gradient(value) if self.frozen else value


# --mixed_precision / benchmark names of the half precisions frozen weights may be stored in.
HALF_PRECISION_DTYPES = {"fp16": ms.float16, "bf16": ms.bfloat16}


def store_weights_in(model: nn.Cell, dtype) -> int:
    """Replace the parameters of `model`'s layers by `dtype` copies (frozen base weights in half precision,
    as sd-scripts stores them under --mixed_precision); the layers keep computing in the input's dtype.

    New Parameters are needed: set_data with another dtype silently keeps float32. Returns the bytes saved.
    """
    saved = 0
    for _, cell in model.cells_and_names():
        if not isinstance(cell, FreezableCell):
            continue
        for attribute in ("weight", "bias"):
            param = getattr(cell, attribute, None)
            if param is None or param.dtype == dtype:
                continue
            replacement = Parameter(param.astype(dtype), name=param.name, requires_grad=param.requires_grad)
            saved += param.nbytes - replacement.nbytes
            setattr(cell, attribute, replacement)
            replacement.name = param.name
    return saved


def freeze(model: nn.Cell) -> None:
    """Freeze every parameter of `model` held by a FreezableCell (its layers), for compiled graphs too."""
    for _, cell in model.cells_and_names():
        if isinstance(cell, FreezableCell):
            cell.frozen = True
            for param in cell.get_parameters(expand=False):
                param.requires_grad = False


class Linear(FreezableCell):
    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)
        self.in_features, self.out_features = in_features, out_features
        self.weight = Parameter(_uniform((out_features, in_features), bound), name="weight")
        self.bias = Parameter(_uniform((out_features,), bound), name="bias") if bias else None

    def construct(self, x, weights=None):
        bias = None if self.bias is None else self.operand(self.bias, 1, x, weights)
        return backend.linear(x, self.operand(self.weight, 0, x, weights), bias)


class Conv2d(FreezableCell):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
        super().__init__()
        bound = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        shape = (out_channels, in_channels, kernel_size, kernel_size)
        self.weight = Parameter(_uniform(shape, bound), name="weight")
        self.bias = Parameter(_uniform((out_channels,), bound), name="bias")

    def passed_weights(self) -> List[Tensor]:
        weight, bias = super().passed_weights()
        return [backend.conv_weight_operand(weight) if self.frozen else weight, bias]

    def construct(self, x, weights=None):
        weight, bias = self.operand(self.weight, 0, x, weights), self.operand(self.bias, 1, x, weights)
        return backend.conv2d(x, weight, bias, self.stride, self.padding, self.kernel_size)


class GroupNorm(FreezableCell):
    def __init__(self, num_groups: int, num_channels: int, eps: float):
        super().__init__()
        self.num_groups, self.eps = num_groups, eps
        self.weight = Parameter(Tensor(np.ones(num_channels, np.float32)), name="weight")
        self.bias = Parameter(Tensor(np.zeros(num_channels, np.float32)), name="bias")

    def construct(self, x, weights=None):
        weight, bias = self.operand(self.weight, 0, x, weights), self.operand(self.bias, 1, x, weights)
        return backend.group_norm(x, self.num_groups, weight, bias, self.eps)


class LayerNorm(FreezableCell):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = Parameter(Tensor(np.ones(dim, np.float32)), name="weight")
        self.bias = Parameter(Tensor(np.zeros(dim, np.float32)), name="bias")
        self.norm = backend.LayerNormOp(eps)

    def construct(self, x, weights=None):
        return self.norm(x, self.operand(self.weight, 0, x, weights), self.operand(self.bias, 1, x, weights))


class Sequential(nn.SequentialCell):
    """SequentialCell passing a unit's `weights` on to every layer (layers without weights ignore them)."""

    def construct(self, x, weights=None):
        for layer in self.cell_list:
            x = layer(x, weights)
        return x


class SiLU(nn.Cell):
    def construct(self, x, weights=None):
        return backend.silu(x)


class Dropout(nn.Cell):
    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def construct(self, x, weights=None):
        return backend.dropout(x, self.p, self.training)


class Identity(nn.Cell):
    def construct(self, x, weights=None):
        return x


class SinusoidalEmbedding(nn.Cell):
    """SGM's timestep embedding: [cos(v * f), sin(v * f)] with f = 10000^(-i/half), i < half."""

    def __init__(self, dim: int, max_period: float = 10000.0):
        super().__init__()
        half = dim // 2
        self.freqs = Tensor(np.exp(-math.log(max_period) * np.arange(half, dtype=np.float32) / half).reshape(1, -1))

    def construct(self, values):
        args = values.astype(ms.float32).reshape(-1, 1) * self.freqs
        return mint.cat((mint.cos(args), mint.sin(args)), dim=-1)
