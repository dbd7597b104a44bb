"""The numpy linear algebra the LoRA tools share: a module's full delta, its SVD, and sd-scripts'
rules for choosing a rank from singular values.

Weights are in the base layer's layout: Linear [out, in], Conv2d [out, in, k, k]. A convolution is
treated as the matrix [out, in * k * k] (sd-scripts flattens 3x3 kernels the same way), which is
exact: a LoRA conv's down keeps the kernel and its up is 1x1, so up @ down over the flattened
kernel is the merged kernel.
"""

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

# Below this largest singular value a delta counts as zero and gets rank 1 (sd-scripts' MIN_SV).
MIN_SINGULAR_VALUE = 1e-6
DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")


def as_matrix(weight: np.ndarray) -> np.ndarray:
    """[out, in] or [out, in, k, k] -> [out, in * k * k]."""
    return weight.reshape(weight.shape[0], -1)


def lora_delta(down: np.ndarray, up: np.ndarray, scale: float) -> np.ndarray:
    """scale * up @ down in the base weight's layout, float32."""
    rank = down.shape[0]
    product = as_matrix(up.astype(np.float32)) @ down.astype(np.float32).reshape(rank, -1)
    return (product * scale).reshape((up.shape[0],) + down.shape[1:]).astype(np.float32)


def delta_norm(down: np.ndarray, up: np.ndarray, scale: float) -> float:
    """Frobenius norm of scale * up @ down without forming it: |UD|^2 = sum((U^T U) * (D D^T))."""
    up_matrix = as_matrix(up.astype(np.float64))
    down_matrix = down.astype(np.float64).reshape(down.shape[0], -1)
    squared = np.sum((up_matrix.T @ up_matrix) * (down_matrix @ down_matrix.T))
    return float(abs(scale) * np.sqrt(max(squared, 0.0)))


def factored_svd(down: np.ndarray, up: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SVD (U [out, r], S [r], Vh [r, in*k*k]) of up @ down, through QR of each factor.

    Equal to the SVD of the full product (the singular values beyond r are zero) at the cost of an
    r x r SVD, so resizing a full-size SDXL LoRA takes seconds rather than hundreds of large SVDs.
    """
    rank = down.shape[0]
    q_up, r_up = np.linalg.qr(as_matrix(up.astype(np.float64)))
    q_down, r_down = np.linalg.qr(down.astype(np.float64).reshape(rank, -1).T)
    core_u, singular_values, core_vh = np.linalg.svd(r_up @ r_down.T)
    return q_up @ core_u, singular_values, core_vh @ q_down.T


def top_factors(u: np.ndarray, s: np.ndarray, vh: np.ndarray, rank: int,
                down_tail: Tuple[int, ...]) -> Tuple[np.ndarray, np.ndarray]:
    """(down, up) of the best rank-`rank` approximation: up = U_r diag(S_r), down = Vh_r, reshaped to
    LoRA layouts (down [rank, *down_tail], up [out, rank(, 1, 1)]). Missing directions are zero."""
    available = min(rank, len(s))
    up = np.zeros((u.shape[0], rank), np.float32)
    down = np.zeros((rank, vh.shape[1]), np.float32)
    up[:, :available] = u[:, :available] * s[:available]
    down[:available] = vh[:available]
    ones = (1,) * (len(down_tail) - 1)
    return down.reshape((rank,) + tuple(down_tail)), up.reshape((u.shape[0], rank) + ones)


# ---- Choosing a rank (sd-scripts' resize_lora.py rules, off-by-ones included) ---------------------


def _clamped(index: int, count: int) -> int:
    return max(1, min(index, count - 1))


def dynamic_rank(singular_values: np.ndarray, method: str, param: float) -> int:
    """The rank sd-scripts' --dynamic_method picks, before the --new_rank cap.

    `singular_values` is the full, descending spectrum of the delta (min(out, in) values).
    sv_ratio keeps values above S[0] / param; sv_cumulative reaches `param` of sum(S);
    sv_fro reaches `param` of the Frobenius norm. Each index is clamped to [1, len - 1] and one is
    added, as sd-scripts does.
    """
    s = np.asarray(singular_values, dtype=np.float64)
    count = len(s)
    if method == "sv_ratio":
        index = int(np.sum(s > s[0] / param))
    elif method == "sv_cumulative":
        index = int(np.searchsorted(np.cumsum(s) / np.sum(s), param)) + 1
    elif method == "sv_fro":
        squared = s ** 2
        index = int(np.searchsorted(np.cumsum(squared) / np.sum(squared), param ** 2)) + 1
    else:
        raise ValueError(f"unknown dynamic method {method!r} (choose from {', '.join(DYNAMIC_METHODS)})")
    return _clamped(index, count) + 1


def resized_rank(singular_values: np.ndarray, max_rank: int, method: Optional[str], param: Optional[float]) -> int:
    """The rank a module is resized to: `max_rank`, or the dynamic choice capped by it; 1 for a zero delta.

    Never more than the spectrum's length, min(out, in), where sd-scripts would fail.
    """
    if singular_values[0] <= MIN_SINGULAR_VALUE:
        return 1
    rank = max_rank if method is None else dynamic_rank(singular_values, method, param)
    return min(rank, max_rank, len(singular_values))


@dataclass
class Retained:
    """How much of a spectrum the first `rank` singular values keep (sd-scripts' --verbose figures)."""

    sum_retained: float  # sum(S[:rank]) / sum(S)
    fro_retained: float  # |S[:rank]| / |S|
    max_ratio: float  # S[0] / S[rank - 1]


def retained(singular_values: np.ndarray, rank: int) -> Retained:
    s = np.abs(np.asarray(singular_values, dtype=np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        return Retained(
            sum_retained=float(np.sum(s[:rank]) / np.sum(s)),
            fro_retained=float(np.sqrt(np.sum(s[:rank] ** 2)) / np.sqrt(np.sum(s ** 2))),
            max_ratio=float(s[0] / s[rank - 1]),
        )


def full_spectrum(singular_values: np.ndarray, length: int) -> np.ndarray:
    """A factored SVD's r values padded with the zeros of the full min(out, in) spectrum."""
    padded = np.zeros(max(length, len(singular_values)), np.float64)
    padded[: len(singular_values)] = singular_values
    return padded
