"""Every module sd-scripts' networks.lora can adapt in an SDXL model, from the model's configs alone.

networks/lora.py finds its targets by walking the built cells, which holds every weight in memory
(about 14 GB at full size). The tools that need only names and shapes (extracting a LoRA from two
checkpoints, checking a LoRA file) use this table instead; the tests hold it to lora.py's walk of
the real cells and to sd-scripts' key list for SDXL base.
"""

from dataclasses import dataclass
from typing import Dict, List, Tuple

from library.sdxl_unet import UNetConfig
from networks.lora_weights import lora_module_name

UNET_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIXES = {"te1": "lora_te1_", "te2": "lora_te2_"}


@dataclass(frozen=True)
class LoRAModuleSpec:
    lora_name: str
    root: str  # "unet", "te1" or "te2"
    path: str  # module path in its model: SGM layout for the UNet, Hugging Face CLIP for the text encoders
    shape: Tuple[int, ...]  # the base weight's: [out, in] or [out, in, k, k]
    in_conv_block: bool  # a ResBlock / down- / upsampler module, adapted only with conv_dim

    @property
    def is_conv3x3(self) -> bool:
        return len(self.shape) == 4 and self.shape[2:] != (1, 1)


def sdxl_lora_modules(unet: UNetConfig, te1, te2) -> Dict[str, LoRAModuleSpec]:
    """{Kohya module name: spec} for the UNet and both text encoders (te1/te2: CLIPTextConfig-like,
    with hidden_size, intermediate_size and num_hidden_layers)."""
    specs = _text_encoder_modules("te1", te1) + _text_encoder_modules("te2", te2) + _unet_modules(unet)
    return {spec.lora_name: spec for spec in specs}


def _text_encoder_modules(root: str, config) -> List[LoRAModuleSpec]:
    """CLIPAttention's four projections and CLIPMLP's two layers, in every encoder layer."""
    hidden, intermediate = config.hidden_size, config.intermediate_size
    layers = [("self_attn.k_proj", (hidden, hidden)), ("self_attn.v_proj", (hidden, hidden)),
              ("self_attn.q_proj", (hidden, hidden)), ("self_attn.out_proj", (hidden, hidden)),
              ("mlp.fc1", (intermediate, hidden)), ("mlp.fc2", (hidden, intermediate))]
    specs = []
    for index in range(config.num_hidden_layers):
        for module, shape in layers:
            path = f"text_model.encoder.layers.{index}.{module}"
            specs.append(LoRAModuleSpec(lora_module_name(TEXT_ENCODER_PREFIXES[root], path), root, path, shape, False))
    return specs


def _unet_modules(config: UNetConfig) -> List[LoRAModuleSpec]:
    """Walks the block layout of library.sdxl_unet.SDXLUNet: channels per block and where the
    transformers, downsamplers and upsamplers sit."""
    specs: List[LoRAModuleSpec] = []

    def add(path, shape, in_conv_block):
        specs.append(LoRAModuleSpec(lora_module_name(UNET_PREFIX, path), "unet", path, shape, in_conv_block))

    def resblock(prefix, channels_in, channels_out):
        add(f"{prefix}.in_layers.2", (channels_out, channels_in, 3, 3), True)
        add(f"{prefix}.emb_layers.1", (channels_out, config.time_embed_dim), True)
        add(f"{prefix}.out_layers.3", (channels_out, channels_out, 3, 3), True)
        if channels_in != channels_out:
            add(f"{prefix}.skip_connection", (channels_out, channels_in, 1, 1), True)

    def transformer(prefix, channels, depth):
        inner = (channels // config.num_head_channels) * config.num_head_channels
        add(f"{prefix}.proj_in", (inner, channels), False)
        for index in range(depth):
            block = f"{prefix}.transformer_blocks.{index}"
            for attention, context in (("attn1", inner), ("attn2", config.context_dim)):
                add(f"{block}.{attention}.to_q", (inner, inner), False)
                add(f"{block}.{attention}.to_k", (inner, context), False)
                add(f"{block}.{attention}.to_v", (inner, context), False)
                add(f"{block}.{attention}.to_out.0", (inner, inner), False)
            add(f"{block}.ff.net.0.proj", (inner * 8, inner), False)  # GEGLU: value and gate, 4x wide each
            add(f"{block}.ff.net.2", (inner, inner * 4), False)
        add(f"{prefix}.proj_out", (channels, inner), False)

    levels = len(config.channel_mult)
    channels = config.model_channels
    skip_channels = [channels]
    block = 1
    for level, mult in enumerate(config.channel_mult):
        for _ in range(config.num_res_blocks):
            out = mult * config.model_channels
            resblock(f"input_blocks.{block}.0", channels, out)
            channels = out
            if config.transformer_depth[level] > 0:
                transformer(f"input_blocks.{block}.1", channels, config.transformer_depth[level])
            skip_channels.append(channels)
            block += 1
        if level != levels - 1:
            add(f"input_blocks.{block}.0.op", (channels, channels, 3, 3), True)
            skip_channels.append(channels)
            block += 1

    resblock("middle_block.0", channels, channels)
    transformer("middle_block.1", channels, config.transformer_depth_middle)
    resblock("middle_block.2", channels, channels)

    block = 0
    for level in reversed(range(levels)):
        for index in range(config.num_res_blocks + 1):
            out = config.channel_mult[level] * config.model_channels
            resblock(f"output_blocks.{block}.0", channels + skip_channels.pop(), out)
            channels = out
            has_transformer = config.transformer_depth[level] > 0
            if has_transformer:
                transformer(f"output_blocks.{block}.1", channels, config.transformer_depth[level])
            if level != 0 and index == config.num_res_blocks:
                add(f"output_blocks.{block}.{2 if has_transformer else 1}.conv", (channels, channels, 3, 3), True)
            block += 1
    return specs
