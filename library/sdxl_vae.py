"""SDXL's VAE (AutoencoderKL) as MindSpore cells, in the LDM layout single-file checkpoints use
(`first_stage_model.encoder.down.0.block.0...`). Written here for the same reasons as the UNet: the
single-file names need no conversion, and mindone's `mint` convolutions have no CPU kernels.
"""

from dataclasses import dataclass
from typing import Tuple

import numpy as np

from mindspore import mint, nn

from library import backend
from library.layers import Conv2d, GroupNorm, Identity

SDXL_VAE_SCALE_FACTOR = 0.13025


@dataclass(frozen=True)
class VAEConfig:
    ch: int = 128
    ch_mult: Tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    in_channels: int = 3
    norm_groups: int = 32


SDXL_VAE = VAEConfig()


class ResnetBlock(nn.Cell):
    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels, 1e-6)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = GroupNorm(groups, out_channels, 1e-6)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else Identity()

    def construct(self, x):
        h = self.conv1(backend.silu(self.norm1(x)))
        h = self.conv2(backend.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Cell):
    """Single-head self-attention over all pixels; q/k/v/proj_out are 1x1 convolutions in LDM files."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = GroupNorm(groups, channels, 1e-6)
        self.q = Conv2d(channels, channels, 1)
        self.k = Conv2d(channels, channels, 1)
        self.v = Conv2d(channels, channels, 1)
        self.proj_out = Conv2d(channels, channels, 1)

    def construct(self, x):
        batch, channels, height, width = x.shape
        h = self.norm(x)

        def tokens(t):
            return t.reshape(batch, 1, channels, height * width).swapaxes(2, 3)

        out = backend.attention(tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h)))
        out = out.swapaxes(2, 3).reshape(batch, channels, height, width)
        return x + self.proj_out(out)


class Downsample(nn.Cell):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2)

    def construct(self, x):
        # LDM pads only right and bottom before its stride-2 convolution.
        return self.conv(backend.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Cell):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def construct(self, x):
        return self.conv(mint.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Cell):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def construct(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class EncoderLevel(nn.Cell):
    def __init__(self, blocks, downsample):
        super().__init__()
        self.block = nn.CellList(blocks)
        self.downsample = downsample

    def construct(self, x):
        for block in self.block:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class DecoderLevel(nn.Cell):
    def __init__(self, blocks, upsample):
        super().__init__()
        self.block = nn.CellList(blocks)
        self.upsample = upsample

    def construct(self, x):
        for block in self.block:
            x = block(x)
        return self.upsample(x) if self.upsample is not None else x


class Encoder(nn.Cell):
    def __init__(self, config: VAEConfig):
        super().__init__()
        groups = config.norm_groups
        self.conv_in = Conv2d(config.in_channels, config.ch, 3, padding=1)
        channels = [config.ch * m for m in config.ch_mult]
        levels, ch = [], config.ch
        for level, out_ch in enumerate(channels):
            blocks = []
            for _ in range(config.num_res_blocks):
                blocks.append(ResnetBlock(ch, out_ch, groups))
                ch = out_ch
            last = level == len(channels) - 1
            levels.append(EncoderLevel(blocks, None if last else Downsample(ch)))
        self.down = nn.CellList(levels)
        self.mid = MidBlock(ch, groups)
        self.norm_out = GroupNorm(groups, ch, 1e-6)
        self.conv_out = Conv2d(ch, 2 * config.z_channels, 3, padding=1)

    def construct(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(backend.silu(self.norm_out(h)))


class Decoder(nn.Cell):
    def __init__(self, config: VAEConfig):
        super().__init__()
        groups = config.norm_groups
        channels = [config.ch * m for m in config.ch_mult]
        ch = channels[-1]
        self.conv_in = Conv2d(config.z_channels, ch, 3, padding=1)
        self.mid = MidBlock(ch, groups)
        levels = [None] * len(channels)
        for level in reversed(range(len(channels))):
            blocks = []
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResnetBlock(ch, channels[level], groups))
                ch = channels[level]
            levels[level] = DecoderLevel(blocks, Upsample(ch) if level != 0 else None)
        self.up = nn.CellList(levels)
        self.norm_out = GroupNorm(groups, ch, 1e-6)
        self.conv_out = Conv2d(ch, config.in_channels, 3, padding=1)

    def construct(self, z):
        h = self.mid(self.conv_in(z))
        for index in range(len(self.up) - 1, -1, -1):
            h = self.up[index](h)
        return self.conv_out(backend.silu(self.norm_out(h)))


class AutoencoderKL(nn.Cell):
    def __init__(self, config: VAEConfig = SDXL_VAE):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = Conv2d(2 * config.z_channels, 2 * config.z_channels, 1)
        self.post_quant_conv = Conv2d(config.z_channels, config.z_channels, 1)

    def encode_moments(self, images):
        """images in [-1, 1] -> (mean, logvar) of the latent distribution, unscaled."""
        moments = self.quant_conv(self.encoder(images))
        z = self.config.z_channels
        return moments[:, :z], moments[:, z:]

    def decode(self, latents):
        """Unscaled latents -> images in about [-1, 1]."""
        return self.decoder(self.post_quant_conv(latents))

    def construct(self, images):
        return self.encode_moments(images)


def sample_latents(mean: np.ndarray, logvar: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw from the diagonal Gaussian as diffusers' `latent_dist.sample()` does (sd-scripts caches a sample)."""
    std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))
    return mean + std * rng.standard_normal(mean.shape).astype(mean.dtype)
