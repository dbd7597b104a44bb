"""LoRA files for the LoRA tool tests, written with plain numpy + safetensors the way torch sd-scripts
writes them, and the deltas they stand for computed independently of the code under test."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import safetensors.numpy

from library.text_encoders import clip_text_config
from networks.sdxl_lora_modules import sdxl_lora_modules
from tools.make_tiny_sdxl import TINY_TE1, TINY_TE2, TINY_UNET

REPO = Path(__file__).resolve().parent.parent

# One module of each kind on the tiny SDXL: attention Linear, cross-attention to_k (context input),
# 3x3 conv, 1x1 conv, TE1 and TE2 (TE2's q/k/v are fused in single files).
MODULES = [
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
    "lora_unet_output_blocks_2_1_transformer_blocks_0_attn2_to_k",
    "lora_unet_input_blocks_4_0_in_layers_2",
    "lora_unet_input_blocks_4_0_skip_connection",
    "lora_te1_text_model_encoder_layers_0_mlp_fc1",
    "lora_te2_text_model_encoder_layers_1_self_attn_k_proj",
]

# The diffusers-layout Kohya names older files use for MODULES' UNet entries.
DIFFUSERS_NAMES = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q":
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
    "lora_unet_output_blocks_2_1_transformer_blocks_0_attn2_to_k":
        "lora_unet_up_blocks_0_attentions_2_transformer_blocks_0_attn2_to_k",
    "lora_unet_input_blocks_4_0_in_layers_2": "lora_unet_down_blocks_1_resnets_0_conv1",
    "lora_unet_input_blocks_4_0_skip_connection": "lora_unet_down_blocks_1_resnets_0_conv_shortcut",
}


def renamed(tensors, names):
    """`tensors` with their module names replaced by `names` where it has them."""
    out = {}
    for key, value in tensors.items():
        module, _, part = key.partition(".")
        out[f"{names.get(module, module)}.{part}"] = value
    return out


def tiny_modules():
    """{Kohya name: LoRAModuleSpec} of the tiny SDXL."""
    return sdxl_lora_modules(TINY_UNET, clip_text_config(**TINY_TE1), clip_text_config(**TINY_TE2))


def random_lora(names, rank, alpha, seed, dtype=np.float32, spread=0.2):
    """Kohya tensors for `names` of the tiny SDXL: lora_down [r, in(, k, k)], lora_up [out, r(, 1, 1)];
    alpha None leaves the alpha tensors out (old files)."""
    specs = tiny_modules()
    rng = np.random.default_rng(seed)
    tensors = {}
    for name in names:
        shape = specs[name].shape
        tensors[f"{name}.lora_down.weight"] = (spread * rng.standard_normal((rank,) + shape[1:])).astype(dtype)
        tensors[f"{name}.lora_up.weight"] = (spread * rng.standard_normal((shape[0], rank) + (1,) * (len(shape) - 2))
                                             ).astype(dtype)
        if alpha is not None:
            tensors[f"{name}.alpha"] = np.array(alpha, dtype)
    return tensors


def write(path, tensors, metadata=None):
    # safetensors.numpy writes an array's memory as it lies: a transposed view must be made contiguous.
    safetensors.numpy.save_file({k: np.require(v, requirements="C") for k, v in tensors.items()}, str(path), metadata)
    return str(path)


def load(path):
    return safetensors.numpy.load_file(str(path))


def delta(tensors, name, multiplier=1.0):
    """multiplier * alpha / rank * up @ down in float64, with an einsum over the rank axis."""
    down = tensors[f"{name}.lora_down.weight"].astype(np.float64)
    up = tensors[f"{name}.lora_up.weight"].astype(np.float64)
    rank = down.shape[0]
    alpha = float(tensors[f"{name}.alpha"]) if f"{name}.alpha" in tensors else rank
    up_matrix = up.reshape(up.shape[0], rank)
    return np.einsum("or,r...->o...", up_matrix, down) * alpha / rank * multiplier


def stored_weight(checkpoint, spec):
    """A module's base weight as a Stability single file stores it (TE2 in open_clip's layout), as a view
    that can be changed in place."""
    if spec.root == "unet":
        return checkpoint[f"model.diffusion_model.{spec.path}.weight"]
    if spec.root == "te1":
        return checkpoint[f"conditioner.embedders.0.transformer.{spec.path}.weight"]
    layer, module = spec.path.split(".")[3], ".".join(spec.path.split(".")[4:])
    block = f"conditioner.embedders.1.model.transformer.resblocks.{layer}"
    if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        third = ("q", "k", "v").index(module[len("self_attn.")])
        fused = checkpoint[f"{block}.attn.in_proj_weight"]
        rows = fused.shape[0] // 3
        return fused[third * rows:(third + 1) * rows]
    return checkpoint[{"self_attn.out_proj": f"{block}.attn.out_proj.weight", "mlp.fc1": f"{block}.mlp.c_fc.weight",
                       "mlp.fc2": f"{block}.mlp.c_proj.weight"}[module]]


def run_tool(script, *args):
    """Run networks/<script> as a command from the repository root; returns the CompletedProcess."""
    return subprocess.run([sys.executable, f"networks/{script}", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
