"""Every key-name conversion between checkpoint formats, in one place.

- SGM UNet (single files, Kohya LoRA names)  <-> diffusers UNet (diffusers folders)
- LDM VAE (single files)                      <-> diffusers VAE
- open_clip ViT-bigG text encoder (single files) <-> Hugging Face CLIP layout
- Hugging Face CLIP names                     <-> mindone.transformers parameter names
The UNet and VAE maps are generated from the model configuration, so they hold for any model with
SDXL's topology (the full model and the tiny test model alike).
"""

from functools import lru_cache
from typing import Dict

import numpy as np

from library.sdxl_unet import UNetConfig
from library.sdxl_vae import VAEConfig

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TE1_PREFIX = "conditioner.embedders.0.transformer."
TE2_PREFIX = "conditioner.embedders.1.model."

_RESNET_SGM_TO_DIFFUSERS = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}


def unet_sgm_to_diffusers_prefixes(config: UNetConfig) -> Dict[str, str]:
    """Module-path prefixes (ending in '.') of the SGM UNet -> diffusers UNet, for every block."""
    prefixes = {
        "time_embed.0.": "time_embedding.linear_1.",
        "time_embed.2.": "time_embedding.linear_2.",
        "label_emb.0.0.": "add_embedding.linear_1.",
        "label_emb.0.2.": "add_embedding.linear_2.",
        "input_blocks.0.0.": "conv_in.",
        "out.0.": "conv_norm_out.",
        "out.2.": "conv_out.",
    }
    levels = len(config.channel_mult)
    per_level = config.num_res_blocks + 1

    def resnet(sgm, diffusers):
        for sgm_part, diffusers_part in _RESNET_SGM_TO_DIFFUSERS.items():
            prefixes[f"{sgm}{sgm_part}."] = f"{diffusers}{diffusers_part}."

    for level in range(levels):
        has_attention = config.transformer_depth[level] > 0
        for index in range(config.num_res_blocks):
            block = per_level * level + index + 1
            resnet(f"input_blocks.{block}.0.", f"down_blocks.{level}.resnets.{index}.")
            if has_attention:
                prefixes[f"input_blocks.{block}.1."] = f"down_blocks.{level}.attentions.{index}."
        if level < levels - 1:
            prefixes[f"input_blocks.{per_level * (level + 1)}.0.op."] = f"down_blocks.{level}.downsamplers.0.conv."

    resnet("middle_block.0.", "mid_block.resnets.0.")
    prefixes["middle_block.1."] = "mid_block.attentions.0."
    resnet("middle_block.2.", "mid_block.resnets.1.")

    for up_level in range(levels):
        level = levels - 1 - up_level
        has_attention = config.transformer_depth[level] > 0
        for index in range(per_level):
            block = per_level * up_level + index
            resnet(f"output_blocks.{block}.0.", f"up_blocks.{up_level}.resnets.{index}.")
            if has_attention:
                prefixes[f"output_blocks.{block}.1."] = f"up_blocks.{up_level}.attentions.{index}."
        if level > 0:
            upsample_index = 2 if has_attention else 1
            block = per_level * up_level + per_level - 1
            prefixes[f"output_blocks.{block}.{upsample_index}.conv."] = f"up_blocks.{up_level}.upsamplers.0.conv."
    return prefixes


def _rename_by_prefix(name: str, prefixes: Dict[str, str]) -> str:
    """Longest matching prefix wins (e.g. `input_blocks.1.0.in_layers.0.` before `input_blocks.1.`)."""
    best = ""
    for prefix in prefixes:
        if name.startswith(prefix) and len(prefix) > len(best):
            best = prefix
    if not best:
        raise KeyError(name)
    return prefixes[best] + name[len(best) :]


@lru_cache(maxsize=8)
def _unet_diffusers_to_sgm_prefixes(config: UNetConfig) -> Dict[str, str]:
    return {d: s for s, d in unet_sgm_to_diffusers_prefixes(config).items()}


def unet_diffusers_name_to_sgm(name: str, config: UNetConfig) -> str:
    """One diffusers UNet tensor name -> its SGM name; KeyError for a name outside the UNet."""
    return _rename_by_prefix(name, _unet_diffusers_to_sgm_prefixes(config))


def unet_diffusers_to_sgm(state: Dict[str, np.ndarray], config: UNetConfig) -> Dict[str, np.ndarray]:
    return {unet_diffusers_name_to_sgm(name, config): value for name, value in state.items()}


def unet_sgm_to_diffusers(state: Dict[str, np.ndarray], config: UNetConfig) -> Dict[str, np.ndarray]:
    prefixes = unet_sgm_to_diffusers_prefixes(config)
    return {_rename_by_prefix(name, prefixes): value for name, value in state.items()}


def unet_sgm_module_to_diffusers(sgm_module: str, config: UNetConfig) -> str:
    """`input_blocks.4.1.proj_in` -> `down_blocks.1.attentions.0.proj_in` (module paths, no parameter suffix)."""
    return _rename_by_prefix(sgm_module + ".", unet_sgm_to_diffusers_prefixes(config))[:-1]


def unet_diffusers_module_to_sgm(diffusers_module: str, config: UNetConfig) -> str:
    return unet_diffusers_name_to_sgm(diffusers_module + ".", config)[:-1]


# ---- VAE ------------------------------------------------------------------------------------------

_VAE_ATTENTION_LDM_TO_DIFFUSERS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def vae_ldm_to_diffusers_prefixes(config: VAEConfig) -> Dict[str, str]:
    levels = len(config.ch_mult)
    prefixes = {
        "quant_conv.": "quant_conv.",
        "post_quant_conv.": "post_quant_conv.",
    }
    for part in ("encoder", "decoder"):
        prefixes[f"{part}.conv_in."] = f"{part}.conv_in."
        prefixes[f"{part}.conv_out."] = f"{part}.conv_out."
        prefixes[f"{part}.norm_out."] = f"{part}.conv_norm_out."
        prefixes[f"{part}.mid.block_1."] = f"{part}.mid_block.resnets.0."
        prefixes[f"{part}.mid.block_2."] = f"{part}.mid_block.resnets.1."
        for ldm, diffusers in _VAE_ATTENTION_LDM_TO_DIFFUSERS.items():
            prefixes[f"{part}.mid.attn_1.{ldm}."] = f"{part}.mid_block.attentions.0.{diffusers}."
    for level in range(levels):
        for index in range(config.num_res_blocks):
            prefixes[f"encoder.down.{level}.block.{index}.nin_shortcut."] = (
                f"encoder.down_blocks.{level}.resnets.{index}.conv_shortcut."
            )
            prefixes[f"encoder.down.{level}.block.{index}."] = f"encoder.down_blocks.{level}.resnets.{index}."
        if level < levels - 1:
            prefixes[f"encoder.down.{level}.downsample.conv."] = f"encoder.down_blocks.{level}.downsamplers.0.conv."
        up_block = levels - 1 - level
        for index in range(config.num_res_blocks + 1):
            prefixes[f"decoder.up.{level}.block.{index}.nin_shortcut."] = (
                f"decoder.up_blocks.{up_block}.resnets.{index}.conv_shortcut."
            )
            prefixes[f"decoder.up.{level}.block.{index}."] = f"decoder.up_blocks.{up_block}.resnets.{index}."
        if level > 0:
            prefixes[f"decoder.up.{level}.upsample.conv."] = f"decoder.up_blocks.{up_block}.upsamplers.0.conv."
    return prefixes


def _is_vae_attention_weight(ldm_name: str) -> bool:
    return ".mid.attn_1." in ldm_name and ldm_name.endswith(".weight") and ".norm." not in ldm_name


def vae_diffusers_to_ldm(state: Dict[str, np.ndarray], config: VAEConfig) -> Dict[str, np.ndarray]:
    """Diffusers stores the mid-block attention projections as Linear [C, C]; LDM as 1x1 conv [C, C, 1, 1]."""
    reverse = {d: s for s, d in vae_ldm_to_diffusers_prefixes(config).items()}
    out = {}
    for name, value in state.items():
        ldm_name = _rename_by_prefix(name, reverse)
        if _is_vae_attention_weight(ldm_name) and value.ndim == 2:
            value = value.reshape(*value.shape, 1, 1)
        out[ldm_name] = value
    return out


def vae_ldm_to_diffusers(state: Dict[str, np.ndarray], config: VAEConfig) -> Dict[str, np.ndarray]:
    prefixes = vae_ldm_to_diffusers_prefixes(config)
    out = {}
    for name, value in state.items():
        if _is_vae_attention_weight(name):
            value = value.reshape(value.shape[0], value.shape[1])
        out[_rename_by_prefix(name, prefixes)] = value
    return out


# ---- Text encoder 2: open_clip <-> Hugging Face CLIP ----------------------------------------------

_OPEN_CLIP_LAYER_TO_HF = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}


def open_clip_to_hf(state: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """open_clip ViT-bigG text tower -> HF CLIPTextModelWithProjection state dict.

    `text_projection` is transposed: open_clip computes `x @ P`, HF a Linear `x @ W.T`, so W = P.T
    (as diffusers, ComfyUI and mindone do; sd-scripts' own loader copies it untransposed).
    `logit_scale` belongs to the CLIP loss, not the text encoder, and is returned under its own name.
    """
    out = {}
    for name, value in state.items():
        if name == "token_embedding.weight":
            out["text_model.embeddings.token_embedding.weight"] = value
        elif name == "positional_embedding":
            out["text_model.embeddings.position_embedding.weight"] = value
        elif name.startswith("ln_final."):
            out["text_model.final_layer_norm." + name.split(".", 1)[1]] = value
        elif name == "text_projection":
            out["text_projection.weight"] = np.ascontiguousarray(value.T)
        elif name == "logit_scale":
            out["logit_scale"] = value
        elif name.startswith("transformer.resblocks."):
            layer, rest = name[len("transformer.resblocks.") :].split(".", 1)
            hf_layer = f"text_model.encoder.layers.{layer}."
            if rest.startswith("attn.in_proj_"):
                kind = rest.rsplit("_", 1)[1]  # weight or bias
                for part, chunk in zip(("q_proj", "k_proj", "v_proj"), np.split(value, 3, axis=0)):
                    out[f"{hf_layer}self_attn.{part}.{kind}"] = np.ascontiguousarray(chunk)
            else:
                module, kind = rest.rsplit(".", 1)
                if module not in _OPEN_CLIP_LAYER_TO_HF:
                    raise KeyError(name)
                out[f"{hf_layer}{_OPEN_CLIP_LAYER_TO_HF[module]}.{kind}"] = value
        else:
            raise KeyError(name)
    return out


def hf_to_open_clip(state: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    hf_to_oc_layer = {v: k for k, v in _OPEN_CLIP_LAYER_TO_HF.items()}
    out, pending_qkv = {}, {}
    for name, value in state.items():
        if name == "text_model.embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif name == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif name.startswith("text_model.final_layer_norm."):
            out["ln_final." + name.rsplit(".", 1)[1]] = value
        elif name == "text_projection.weight":
            out["text_projection"] = np.ascontiguousarray(value.T)
        elif name == "logit_scale":
            out["logit_scale"] = value
        elif name.startswith("text_model.encoder.layers."):
            layer, rest = name[len("text_model.encoder.layers.") :].split(".", 1)
            module, kind = rest.rsplit(".", 1)
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                pending_qkv.setdefault((layer, kind), {})[module.split(".")[1]] = value
            elif module in hf_to_oc_layer:
                out[f"transformer.resblocks.{layer}.{hf_to_oc_layer[module]}.{kind}"] = value
            else:
                raise KeyError(name)
        elif name == "text_model.embeddings.position_ids":
            continue
        else:
            raise KeyError(name)
    for (layer, kind), parts in pending_qkv.items():
        fused = np.concatenate([parts["q_proj"], parts["k_proj"], parts["v_proj"]], axis=0)
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = fused
    return out


# ---- Hugging Face CLIP names <-> mindone.transformers parameter names --------------------------------


def hf_clip_to_mindone_name(name: str) -> str:
    """mindone keeps MindSpore's legacy names for LayerNorm (gamma/beta) and Embedding (embedding_table)."""
    module, kind = name.rsplit(".", 1)
    leaf = module.rsplit(".", 1)[-1]
    if "layer_norm" in leaf:
        return f"{module}.{'gamma' if kind == 'weight' else 'beta'}"
    if leaf.endswith("embedding") and kind == "weight":
        return f"{module}.embedding_table"
    return name


def mindone_to_hf_clip_name(name: str) -> str:
    module, kind = name.rsplit(".", 1)
    return f"{module}.{ {'gamma': 'weight', 'beta': 'bias', 'embedding_table': 'weight'}.get(kind, kind) }"
