"""SDXL's UNet as MindSpore cells, in the SGM layout (input_blocks / middle_block / output_blocks).

Written here rather than reusing mindone.diffusers' UNet2DConditionModel because (measured, see README
"Design"): its parameter names are diffusers' while single-file checkpoints and every Kohya LoRA key
use SGM names, so this layout needs no conversion on the main path; its `mint` convolution and
normalisation ops have no CPU kernels in MindSpore 2.10; and training needs control over how the
model is split into separately compiled blocks to fit a full-size step in 24 GiB.
"""

from dataclasses import dataclass
from typing import Tuple

from mindspore import mint, nn

from library import backend
from library.layers import Conv2d, Dropout, GroupNorm, Identity, LayerNorm, Linear, Sequential, SiLU, SinusoidalEmbedding

# SDXL conditions on (original_size, crop_top_left, target_size), each number embedded in 256 dims.
SIZE_EMBEDDING_DIM = 256
NUM_SIZE_VALUES = 6


@dataclass(frozen=True)
class UNetConfig:
    model_channels: int = 320
    channel_mult: Tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 2
    transformer_depth: Tuple[int, ...] = (0, 2, 10)
    transformer_depth_middle: int = 10
    num_head_channels: int = 64
    context_dim: int = 2048
    adm_in_channels: int = 2816
    in_channels: int = 4
    out_channels: int = 4
    norm_groups: int = 32

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4

    @property
    def pooled_dim(self) -> int:
        return self.adm_in_channels - SIZE_EMBEDDING_DIM * NUM_SIZE_VALUES


SDXL_BASE_UNET = UNetConfig()


class ResBlock(nn.Cell):
    def __init__(self, channels: int, out_channels: int, emb_channels: int, groups: int):
        super().__init__()
        self.in_layers = Sequential([GroupNorm(groups, channels, 1e-5), SiLU(), Conv2d(channels, out_channels, 3, padding=1)])
        self.emb_layers = Sequential([SiLU(), Linear(emb_channels, out_channels)])
        self.out_layers = Sequential(
            [GroupNorm(groups, out_channels, 1e-5), SiLU(), Dropout(0.0), Conv2d(out_channels, out_channels, 3, padding=1)]
        )
        self.skip_connection = Conv2d(channels, out_channels, 1) if channels != out_channels else Identity()

    def hidden(self, x, emb, weights=None):
        """The first half: the input convolution plus the timestep embedding."""
        return self.in_layers(x, weights) + self.emb_layers(emb, weights)[:, :, None, None]

    def output(self, x, hidden, weights=None):
        """The second half: the skip connection of x plus the output convolution of the hidden state."""
        return self.skip_connection(x, weights) + self.out_layers(hidden, weights)

    def construct(self, x, emb, context, weights=None):
        return self.output(x, self.hidden(x, emb, weights), weights)


class CrossAttention(nn.Cell):
    def __init__(self, query_dim: int, context_dim: int, heads: int, head_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = Linear(query_dim, inner, bias=False)
        self.to_k = Linear(context_dim, inner, bias=False)
        self.to_v = Linear(context_dim, inner, bias=False)
        self.to_out = Sequential([Linear(inner, query_dim), Dropout(0.0)])

    def _split_heads(self, x):
        batch, tokens, _ = x.shape
        return x.reshape(batch, tokens, self.heads, -1).swapaxes(1, 2)

    def construct(self, x, context, weights=None):
        q = self._split_heads(self.to_q(x, weights))
        k = self._split_heads(self.to_k(context, weights))
        v = self._split_heads(self.to_v(context, weights))
        out = backend.attention(q, k, v)
        batch, _, tokens, _ = out.shape
        return self.to_out(out.swapaxes(1, 2).reshape(batch, tokens, -1), weights)


class GEGLU(nn.Cell):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.dim_out = dim_out
        self.proj = Linear(dim_in, dim_out * 2)

    def construct(self, x, weights=None):
        h = self.proj(x, weights)
        # Slicing rather than chunk: Chunk has no CPU kernel in graph mode.
        return h[..., : self.dim_out] * backend.gelu(h[..., self.dim_out :])


class FeedForward(nn.Cell):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner = dim * mult
        self.net = Sequential([GEGLU(dim, inner), Dropout(0.0), Linear(inner, dim)])

    def construct(self, x, weights=None):
        return self.net(x, weights)


class BasicTransformerBlock(nn.Cell):
    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, head_dim)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, head_dim)
        self.norm1 = LayerNorm(dim)
        self.norm2 = LayerNorm(dim)
        self.norm3 = LayerNorm(dim)

    def construct(self, x, context, weights=None):
        h = self.norm1(x, weights)
        x = x + self.attn1(h, h, weights)
        x = x + self.attn2(self.norm2(x, weights), context, weights)
        return x + self.ff(self.norm3(x, weights), weights)


class SpatialTransformer(nn.Cell):
    def __init__(self, channels: int, heads: int, head_dim: int, depth: int, context_dim: int, groups: int):
        super().__init__()
        inner = heads * head_dim
        self.norm = GroupNorm(groups, channels, 1e-6)
        self.proj_in = Linear(channels, inner)
        self.transformer_blocks = nn.CellList(
            [BasicTransformerBlock(inner, heads, head_dim, context_dim) for _ in range(depth)]
        )
        self.proj_out = Linear(inner, channels)

    def project_in(self, x, weights=None):
        """[B, C, H, W] -> normalised, projected tokens [B, H*W, inner]."""
        batch, channels, height, width = x.shape
        h = self.norm(x, weights).reshape(batch, channels, height * width).swapaxes(1, 2)
        return self.proj_in(h, weights)

    def project_out(self, x, tokens, weights=None):
        """The residual output: x + the tokens projected back to [B, C, H, W]."""
        batch, channels, height, width = x.shape
        h = self.proj_out(tokens, weights)
        return x + h.swapaxes(1, 2).reshape(batch, channels, height, width)

    def construct(self, x, emb, context):
        h = self.project_in(x)
        for block in self.transformer_blocks:
            h = block(h, context)
        return self.project_out(x, h)


class Downsample(nn.Cell):
    def __init__(self, channels: int):
        super().__init__()
        self.op = Conv2d(channels, channels, 3, stride=2, padding=1)

    def construct(self, x, emb, context, weights=None):
        return self.op(x, weights)


class Upsample(nn.Cell):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def construct(self, x, emb, context, weights=None):
        return self.conv(mint.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"), weights)


class InputConv(Conv2d):
    """The first 3x3 convolution; SGM names its weights input_blocks.0.0.weight directly."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 3, padding=1)

    def construct(self, x, emb, context, weights=None):
        return super().construct(x, weights)


class TimestepEmbedSequential(nn.SequentialCell):
    """A block of the SGM UNet: layers applied in order, each taking (x, emb, context)."""

    def construct(self, x, emb, context):
        for layer in self.cell_list:
            x = layer(x, emb, context)
        return x


class SDXLUNet(nn.Cell):
    """construct(latents, timesteps, context, y) -> predicted noise (or v)."""

    def __init__(self, config: UNetConfig = SDXL_BASE_UNET):
        super().__init__()
        self.config = config
        ch = config.model_channels
        groups = config.norm_groups
        emb_dim = config.time_embed_dim

        self.time_step_embedding = SinusoidalEmbedding(ch)
        self.time_embed = nn.SequentialCell([Linear(ch, emb_dim), SiLU(), Linear(emb_dim, emb_dim)])
        self.label_emb = nn.SequentialCell(
            [nn.SequentialCell([Linear(config.adm_in_channels, emb_dim), SiLU(), Linear(emb_dim, emb_dim)])]
        )

        def transformer(channels, depth):
            heads = channels // config.num_head_channels
            return SpatialTransformer(channels, heads, config.num_head_channels, depth, config.context_dim, groups)

        input_blocks = [TimestepEmbedSequential([InputConv(config.in_channels, ch)])]
        skip_channels = [ch]
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                layers = [ResBlock(ch, mult * config.model_channels, emb_dim, groups)]
                ch = mult * config.model_channels
                if config.transformer_depth[level] > 0:
                    layers.append(transformer(ch, config.transformer_depth[level]))
                input_blocks.append(TimestepEmbedSequential(layers))
                skip_channels.append(ch)
            if level != len(config.channel_mult) - 1:
                input_blocks.append(TimestepEmbedSequential([Downsample(ch)]))
                skip_channels.append(ch)
        self.input_blocks = nn.CellList(input_blocks)

        self.middle_block = TimestepEmbedSequential(
            [
                ResBlock(ch, ch, emb_dim, groups),
                transformer(ch, config.transformer_depth_middle),
                ResBlock(ch, ch, emb_dim, groups),
            ]
        )

        output_blocks = []
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for index in range(config.num_res_blocks + 1):
                out_ch = mult * config.model_channels
                layers = [ResBlock(ch + skip_channels.pop(), out_ch, emb_dim, groups)]
                ch = out_ch
                if config.transformer_depth[level] > 0:
                    layers.append(transformer(ch, config.transformer_depth[level]))
                if level != 0 and index == config.num_res_blocks:
                    layers.append(Upsample(ch))
                output_blocks.append(TimestepEmbedSequential(layers))
        self.output_blocks = nn.CellList(output_blocks)

        self.out = Sequential([GroupNorm(groups, ch, 1e-5), SiLU(), Conv2d(ch, config.out_channels, 3, padding=1)])

    def embedding(self, timesteps, y):
        """The time + vector-conditioning embedding every ResBlock receives."""
        return self.time_embed(self.time_step_embedding(timesteps)) + self.label_emb(y)

    def construct(self, x, timesteps, context, y):
        emb = self.embedding(timesteps, y)
        h = x
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for index, block in enumerate(self.output_blocks):
            h = block(mint.cat((h, skips[len(skips) - 1 - index]), dim=1), emb, context)
        return self.out(h)


class SizeEmbedding(nn.Cell):
    """SDXL's vector conditioning y = [pooled text embedding, 256-d embeddings of the six size numbers]."""

    def __init__(self):
        super().__init__()
        self.embed = SinusoidalEmbedding(SIZE_EMBEDDING_DIM)

    def construct(self, pooled, sizes):
        batch = sizes.shape[0]
        size_emb = self.embed(sizes.reshape(-1)).reshape(batch, SIZE_EMBEDDING_DIM * NUM_SIZE_VALUES)
        return mint.cat((pooled, size_emb.astype(pooled.dtype)), dim=1)
