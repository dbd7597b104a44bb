"""Device-specific choices of functional ops, in one place.

MindSpore 2.10's CPU backend lacks kernels for several `mint` ops that the Ascend path uses
(Conv2d, LayerNorm, GELU, GroupNorm, Dropout, Embedding, Pad, Arange, MSELoss, randn), and its CPU
Conv2D kernel is 30-70x slower than the same convolution as unfold + matmul. Every op below picks
the `mint` op mindone's models use on Ascend/GPU, and a measured equivalent on CPU. Nothing else in
the project asks which device it runs on.

Zero padding on CPU avoids `ops.pad`: the CPU kernel of its gradient (PadV3Grad) keeps state between
launches of a compiled graph, returning a wrong gradient on the second launch, zeros on the third, and
then spinning forever, so every jitted training step through a padded convolution hung at step 3.
"""

import math

import mindspore as ms
from mindspore import mint, nn, ops

# Read once: graph mode cannot call get_context inside a compiled function, and the device is fixed per process.
_ON_CPU = ms.get_context("device_target") == "CPU"
# Above this many bytes of unfolded columns, the CPU convolution is computed in bands of output rows.
_MAX_UNFOLD_BYTES = 256 * 1024 * 1024
_matmul = ops.MatMul()
_matmul_nt = ops.MatMul(transpose_b=True)
_matmul_tt = ops.MatMul(transpose_a=True, transpose_b=True)
# A bias along axis 1 (channels of NCHW, features of [tokens, features]): on CPU the broadcasting Add took 2-2.3x
# as long ([64, 10240] + [10240]: 856 against 430 us; [1024, 1280] + [1280]: 1543 against 683 us).
_bias_add = ops.BiasAdd()


def on_cpu() -> bool:
    return _ON_CPU


class LayerNormOp(nn.Cell):
    """LayerNorm over the last axis, parameters passed in (a cell because the CPU primitive is built once)."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps
        self.cpu_op = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps) if on_cpu() else None

    def construct(self, x, weight, bias):
        if self.cpu_op is None:
            return mint.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, self.eps)
        return self.cpu_op(x, weight, bias)[0]


def layer_norm_input_grad(eps: float):
    """`grad(x, weight, dy) -> dx` of a layer norm over the last axis, for a hand-written backward.

    On CPU the gradient is composed of elementwise ops and means: MindSpore 2.10's CPU LayerNormGrad kernel
    took 1.9 ms for a 64x1280 input (a 1280-channel transformer block at 256 px), about a quarter of the
    block's non-matmul time. Elsewhere the framework's own gradient (one fused kernel)."""
    if not on_cpu():
        def normalized_dot(x, weight, dy):
            return (mint.nn.functional.layer_norm(x, (x.shape[-1],), weight, None, eps) * dy).sum()

        return ops.grad(normalized_dot, grad_position=0)

    def composed(x, weight, dy):
        centered = x - ops.mean(x, -1, keep_dims=True)
        inv_std = ops.rsqrt(ops.mean(centered * centered, -1, keep_dims=True) + eps)
        normalized = centered * inv_std
        scaled = dy * weight
        return inv_std * (scaled - ops.mean(scaled, -1, keep_dims=True)
                          - normalized * ops.mean(scaled * normalized, -1, keep_dims=True))

    return composed


def group_norm(x, num_groups: int, weight, bias, eps: float):
    if not on_cpu():
        return mint.nn.functional.group_norm(x, num_groups, weight, bias, eps)
    return ops.group_norm(x, num_groups, weight, bias, eps)


def gelu(x, approximate: str = "none"):
    if not on_cpu():
        return mint.nn.functional.gelu(x, approximate=approximate)
    return ops.gelu(x, approximate=approximate)


def silu(x):
    return mint.nn.functional.silu(x)


def dropout(x, p: float, training: bool):
    if not training or p == 0.0:
        return x
    if not on_cpu():
        return mint.nn.functional.dropout(x, p, training=True)
    return ops.dropout(x, p)


def linear(x, weight, bias=None):
    if not on_cpu():
        return mint.nn.functional.linear(x, weight, bias)
    # One 2-D MatMul: mint's linear on 3-D tokens went through MatMulExt on CPU, 4-8 ms for a LoRA matrix's
    # 256x640x8 product (a 640-channel projection unit's forward 15.7 ms instead of ~3).
    y = _matmul_nt(x if x.ndim == 2 else x.reshape(-1, x.shape[-1]), weight)
    if bias is not None:
        y = _bias_add(y, bias)
    return y if x.ndim == 2 else y.reshape(x.shape[:-1] + (weight.shape[0],))


def linear_input_grad(dy, weight):
    """dy @ weight: the gradient of a linear layer's 2-D input [tokens, in] from dy [tokens, out]."""
    out_features, in_features = weight.shape
    if on_cpu() and in_features > out_features >= 1280:
        # MindSpore 2.10's CPU MatMul ran [M, K] @ [K, N] at 46-85 GFLOP/s when N > K >= 1280, against 120-170
        # for other shapes; the same product as (W^T dy^T)^T did not (the feed-forward's output projection at
        # 1280 channels: 12.3-13.5 -> 6.2-7.3 ms at 64 tokens, 157-203 -> 104-112 ms at 1024; N = K or K = 640
        # were as fast or faster untransposed).
        return ops.transpose(_matmul_tt(weight, dy), (1, 0))
    return _matmul(dy, weight)


def pad(x, padding):
    """Zero padding, `padding` as (left, right, top, bottom) for the last two axes."""
    if not on_cpu():
        return mint.nn.functional.pad(x, padding)
    return _zero_pad_on_cpu(x, padding)


def _zero_pad_on_cpu(x, padding):
    # The older Pad primitive: its gradient is a plain slice, correct on every launch (see the module docstring).
    left, right, top, bottom = padding
    return ops.Pad(((0, 0),) * (x.ndim - 2) + ((top, bottom), (left, right)))(x)


def conv2d(x, weight, bias, stride: int = 1, padding: int = 0, kernel_size: int = 0):
    """2-D convolution, NCHW, square kernel, zero padding. `weight` is [out, in, k, k], or on CPU the kernel
    matrix [out, in * k * k] that `conv_weight_operand` makes, with its `kernel_size` k."""
    if not on_cpu():
        return mint.nn.functional.conv2d(x, weight, bias, stride, padding)
    return _conv2d_as_matmul(x, weight, bias, stride, padding, kernel_size)


def conv_weight_operand(weight):
    """The tensor a compiled unit receives for a frozen convolution weight (outside the graph): on CPU its kernel
    matrix, a view sharing the weight's memory. Inside a graph the reshape copied the whole weight on every
    call, 6 ms of a 20 ms convolution for 1280 channels 3x3 at 8x8 (59 MB)."""
    if not on_cpu():
        return weight
    return weight.reshape(weight.shape[0], -1)


def _conv2d_as_matmul(x, weight, bias, stride, padding, kernel_size):
    # One 2-D MatMul per sample (and per band of output rows when the unfolded columns are large):
    # mint.matmul of the kernel against batched columns broadcast a copy of the weight per call, and its
    # gradient materialised transposed copies; MatMul's gradient uses transpose flags instead (measured
    # 1.1-2.8x faster per convolution, fwd + bwd, at SDXL's 256 px shapes).
    batch, channels, height, width = x.shape
    if weight.ndim == 2:
        out_channels, kernel, kernel_matrix = weight.shape[0], kernel_size, weight
    else:
        out_channels, _, kernel, _ = weight.shape
        kernel_matrix = weight.reshape(out_channels, channels * kernel * kernel)
    out_h = (height + 2 * padding - kernel) // stride + 1
    out_w = (width + 2 * padding - kernel) // stride + 1
    pointwise = kernel == 1 and stride == 1 and padding == 0
    bytes_per_row = channels * kernel * kernel * out_w * x.itemsize
    rows_per_band = out_h if pointwise else max(1, min(out_h, _MAX_UNFOLD_BYTES // max(bytes_per_row, 1)))
    if rows_per_band < out_h and padding:
        # Bands slice the padded input. In one pass, Im2Col pads by itself: a separate Pad took up to 3x as
        # long as the unfold (640 channels at 32x32: 31 ms against 8 ms, forward).
        x, padding = _zero_pad_on_cpu(x, (padding, padding, padding, padding)), 0
    samples = []
    for index in range(batch):
        sample = x if batch == 1 else x[index : index + 1]
        bands = []
        for row in range(0, out_h, rows_per_band):
            rows = min(rows_per_band, out_h - row)
            if pointwise:
                columns = sample.reshape(channels, height * width)
            else:
                if rows != out_h:
                    sample_band = sample[:, :, row * stride : (row + rows - 1) * stride + kernel, :]
                else:
                    sample_band = sample
                columns = ops.unfold(sample_band, kernel, padding=padding, stride=stride)
                columns = columns.reshape(channels * kernel * kernel, -1)
            bands.append(_matmul(kernel_matrix, columns))
        samples.append(bands[0] if len(bands) == 1 else mint.cat(bands, dim=1))
    y = samples[0] if batch == 1 else ops.stack(samples)
    y = y.reshape(batch, out_channels, out_h, out_w)
    return y if bias is None else _bias_add(y, bias)


def attention(q, k, v):
    """Scaled dot-product attention on [batch, heads, tokens, head_dim] tensors."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = mint.matmul(q * scale, k.swapaxes(-1, -2))
    return mint.matmul(mint.softmax(scores, dim=-1), v)


def adapt_mindone_text_encoder(text_encoder):
    """mindone's GELUActivation calls mint's GELU, which has no CPU kernel; point it at ops.gelu on CPU."""
    if not on_cpu():
        return text_encoder
    from mindone.transformers.activations import GELUActivation

    for _, cell in text_encoder.cells_and_names():
        if isinstance(cell, GELUActivation):
            cell.act = ops.gelu
    return text_encoder
