"""Model configurations: read from diffusers folders' config.json, inferred from single-file weight
shapes (which carry no config), and written back out. SDXL base's own configs ship in configs/sdxl_base/.
"""

import json
import os
from pathlib import Path
from typing import Dict, Tuple

from transformers import CLIPTextConfig

from library.errors import UserError
from library.sdxl_unet import SIZE_EMBEDDING_DIM, NUM_SIZE_VALUES, UNetConfig
from library.sdxl_vae import VAEConfig

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
SDXL_BASE_CONFIG_DIR = CONFIGS_DIR / "sdxl_base"

Shapes = Dict[str, Tuple[int, ...]]


def read_json(path) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}") from None


# ---- UNet ---------------------------------------------------------------------------------------------


def unet_config_to_diffusers(config: UNetConfig) -> dict:
    channels = [config.model_channels * m for m in config.channel_mult]
    cross = ["CrossAttnDownBlock2D" if d > 0 else "DownBlock2D" for d in config.transformer_depth]
    return {
        "_class_name": "UNet2DConditionModel",
        "act_fn": "silu",
        "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": SIZE_EMBEDDING_DIM,
        "attention_head_dim": [c // config.num_head_channels for c in channels],
        "block_out_channels": channels,
        "center_input_sample": False,
        "cross_attention_dim": config.context_dim,
        "down_block_types": cross,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": config.in_channels,
        "layers_per_block": config.num_res_blocks,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "norm_eps": 1e-05,
        "norm_num_groups": config.norm_groups,
        "out_channels": config.out_channels,
        "projection_class_embeddings_input_dim": config.adm_in_channels,
        "sample_size": 128,
        "transformer_layers_per_block": [max(d, 1) for d in config.transformer_depth],
        "up_block_types": [t.replace("Down", "Up") for t in reversed(cross)],
        "use_linear_projection": True,
    }


def unet_config_from_diffusers(raw: dict, source: str) -> UNetConfig:
    try:
        channels = list(raw["block_out_channels"])
        heads = raw["attention_head_dim"]
        heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(channels)
        layers = raw.get("transformer_layers_per_block", 1)
        layers = list(layers) if isinstance(layers, (list, tuple)) else [layers] * len(channels)
        depth = tuple(n if kind.startswith("CrossAttn") else 0 for n, kind in zip(layers, raw["down_block_types"]))
        if raw.get("addition_embed_type") != "text_time" or not raw.get("use_linear_projection", False):
            raise UserError(f"{source}: not an SDXL UNet config (needs addition_embed_type text_time and linear projections)")
        return UNetConfig(
            model_channels=channels[0],
            channel_mult=tuple(c // channels[0] for c in channels),
            num_res_blocks=raw["layers_per_block"],
            transformer_depth=depth,
            transformer_depth_middle=layers[-1],
            num_head_channels=channels[-1] // heads[-1],
            context_dim=raw["cross_attention_dim"],
            adm_in_channels=raw["projection_class_embeddings_input_dim"],
            in_channels=raw["in_channels"],
            out_channels=raw["out_channels"],
            norm_groups=raw.get("norm_num_groups", 32),
        )
    except KeyError as error:
        raise UserError(f"{source}: UNet config is missing key {error}") from None


def unet_config_from_sgm_shapes(shapes: Shapes) -> UNetConfig:
    """Infer the configuration of an SGM-layout UNet (keys without the model.diffusion_model. prefix)."""
    model_channels, in_channels = shapes["input_blocks.0.0.weight"][:2]
    block_ids = {int(name.split(".")[1]) for name in shapes if name.startswith("input_blocks.")}
    downsamples = sorted(int(name.split(".")[1]) for name in shapes if name.endswith(".op.weight"))
    levels = len(downsamples) + 1
    num_res_blocks = (max(block_ids) + 1 - levels) // levels
    channel_mult, depths = [], []
    for level in range(levels):
        first = 1 + level * (num_res_blocks + 1)
        channel_mult.append(shapes[f"input_blocks.{first}.0.out_layers.3.weight"][0] // model_channels)
        depths.append(_count_transformer_blocks(shapes, f"input_blocks.{first}.1."))
    context_dim = next(shape[1] for name, shape in shapes.items() if name.endswith("attn2.to_k.weight"))
    return UNetConfig(
        model_channels=model_channels,
        channel_mult=tuple(channel_mult),
        num_res_blocks=num_res_blocks,
        transformer_depth=tuple(depths),
        transformer_depth_middle=_count_transformer_blocks(shapes, "middle_block.1."),
        context_dim=context_dim,
        adm_in_channels=shapes["label_emb.0.0.weight"][1],
        in_channels=in_channels,
        out_channels=shapes["out.2.weight"][0],
    )


def _count_transformer_blocks(shapes: Shapes, prefix: str) -> int:
    prefix += "transformer_blocks."
    return len({name[len(prefix) :].split(".")[0] for name in shapes if name.startswith(prefix)})


def pooled_dim_of(config: UNetConfig) -> int:
    return config.adm_in_channels - SIZE_EMBEDDING_DIM * NUM_SIZE_VALUES


# ---- VAE ----------------------------------------------------------------------------------------------


def vae_config_to_diffusers(config: VAEConfig) -> dict:
    channels = [config.ch * m for m in config.ch_mult]
    return {
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": channels,
        "down_block_types": ["DownEncoderBlock2D"] * len(channels),
        "in_channels": config.in_channels,
        "latent_channels": config.z_channels,
        "layers_per_block": config.num_res_blocks,
        "norm_num_groups": config.norm_groups,
        "out_channels": config.in_channels,
        "sample_size": 1024,
        "scaling_factor": 0.13025,
        "up_block_types": ["UpDecoderBlock2D"] * len(channels),
    }


def vae_config_from_diffusers(raw: dict, source: str) -> VAEConfig:
    try:
        channels = list(raw["block_out_channels"])
        return VAEConfig(
            ch=channels[0],
            ch_mult=tuple(c // channels[0] for c in channels),
            num_res_blocks=raw["layers_per_block"],
            z_channels=raw["latent_channels"],
            in_channels=raw["in_channels"],
            norm_groups=raw.get("norm_num_groups", 32),
        )
    except KeyError as error:
        raise UserError(f"{source}: VAE config is missing key {error}") from None


def vae_config_from_ldm_shapes(shapes: Shapes) -> VAEConfig:
    return _vae_config_from_shapes(shapes, "down", "block")


def vae_config_from_diffusers_shapes(shapes: Shapes) -> VAEConfig:
    return _vae_config_from_shapes(shapes, "down_blocks", "resnets")


def _vae_config_from_shapes(shapes: Shapes, levels_name: str, blocks_name: str) -> VAEConfig:
    """The two layouts differ only in the names of the encoder's level and block lists."""
    ch, in_channels = shapes["encoder.conv_in.weight"][:2]
    levels = len({name.split(".")[2] for name in shapes if name.startswith(f"encoder.{levels_name}.")})
    blocks = len({name.split(".")[4] for name in shapes if name.startswith(f"encoder.{levels_name}.0.{blocks_name}.")})
    mult = tuple(shapes[f"encoder.{levels_name}.{level}.{blocks_name}.0.conv1.weight"][0] // ch for level in range(levels))
    return VAEConfig(ch=ch, ch_mult=mult, num_res_blocks=blocks, z_channels=shapes["post_quant_conv.weight"][0],
                     in_channels=in_channels)


# ---- Text encoders ------------------------------------------------------------------------------------


def clip_config_from_folder(folder: str) -> CLIPTextConfig:
    raw = read_json(os.path.join(folder, "config.json"))
    raw.pop("architectures", None)
    return CLIPTextConfig(**{k: v for k, v in raw.items() if not k.startswith("_")})


def sdxl_base_configs():
    """(UNetConfig, VAEConfig, TE1 config, TE2 config) of SDXL base, from configs/sdxl_base."""
    unet = unet_config_from_diffusers(read_json(SDXL_BASE_CONFIG_DIR / "unet" / "config.json"), "configs/sdxl_base/unet")
    vae = vae_config_from_diffusers(read_json(SDXL_BASE_CONFIG_DIR / "vae" / "config.json"), "configs/sdxl_base/vae")
    te1 = clip_config_from_folder(str(SDXL_BASE_CONFIG_DIR / "text_encoder"))
    te2 = clip_config_from_folder(str(SDXL_BASE_CONFIG_DIR / "text_encoder_2"))
    return unet, vae, te1, te2
