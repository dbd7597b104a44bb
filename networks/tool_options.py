"""Command-line values the LoRA tools share with sd-scripts: precision names and the compute device."""

from typing import Optional

import ml_dtypes
import numpy as np

from library.errors import UserError

# sd-scripts' --precision / --save_precision / --load_precision names.
PRECISIONS = {"float": np.float32, "fp16": np.float16, "bf16": ml_dtypes.bfloat16}


def precision_dtype(name: Optional[str], flag: str) -> Optional[np.dtype]:
    """The numpy dtype of a precision name given to `flag` (None stays None)."""
    if name is None:
        return None
    if name not in PRECISIONS:
        raise UserError(f"{flag} {name}: unknown precision (choose from {', '.join(PRECISIONS)})")
    return np.dtype(PRECISIONS[name])


def rounded(array: np.ndarray, dtype: Optional[np.dtype]) -> np.ndarray:
    """`array` as float32 holding the values it has in `dtype` (None: just float32)."""
    if dtype is None:
        return array.astype(np.float32)
    return array.astype(dtype).astype(np.float32)


def require_cpu(flag: str, device: Optional[str]) -> None:
    """These tools compute with numpy on the host; a CUDA device name from an sd-scripts command is refused."""
    if device is not None and device != "cpu":
        raise UserError(f"{flag} {device}: this tool computes on the CPU with numpy; use {flag} cpu or leave it out")
