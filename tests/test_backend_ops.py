"""Each device-specific op in library/backend.py against a numpy reference (on CPU these are the replacements)."""

import numpy as np
import pytest

import mindspore as ms

from library import backend
from numpy_conv import numpy_conv2d


def _conv_reference(x, w, b, stride, padding):
    return numpy_conv2d(x, w, stride, padding) + b.reshape(1, -1, 1, 1)


@pytest.mark.parametrize("kernel,stride,padding", [(3, 1, 1), (3, 2, 1), (3, 2, 0), (1, 1, 0)])
def test_conv2d_matches_direct_convolution(kernel, stride, padding):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 9, 7)).astype(np.float32)
    w = rng.standard_normal((4, 5, kernel, kernel)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    got = backend.conv2d(ms.Tensor(x), ms.Tensor(w), ms.Tensor(b), stride, padding).asnumpy()
    np.testing.assert_allclose(got, _conv_reference(x, w, b, stride, padding), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel,stride,padding", [(3, 1, 1), (3, 2, 1), (1, 1, 0)])
def test_conv2d_takes_the_weight_operand_a_unit_receives(kernel, stride, padding):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 5, 9, 7)).astype(np.float32)
    w = rng.standard_normal((4, 5, kernel, kernel)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    weight = ms.Parameter(ms.Tensor(w), name="w", requires_grad=False)
    operand = backend.conv_weight_operand(weight.data)
    if backend.on_cpu():
        assert operand.shape == (4, 5 * kernel * kernel) and operand.data_ptr() == weight.data.data_ptr()
    got = ms.jit(backend.conv2d)(ms.Tensor(x), operand, ms.Tensor(b), stride, padding, kernel).asnumpy()
    np.testing.assert_allclose(got, _conv_reference(x, w, b, stride, padding), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("out_features,in_features", [(1280, 2560), (1280, 1280), (640, 2560)])
def test_linear_input_grad_is_dy_times_weight(out_features, in_features):
    # (1280, 2560) takes the transposed product on CPU, the others the plain one; both are checked, compiled.
    rng = np.random.default_rng(3)
    dy = rng.standard_normal((6, out_features)).astype(np.float32)
    w = rng.standard_normal((out_features, in_features)).astype(np.float32)
    got = ms.jit(backend.linear_input_grad)(ms.Tensor(dy), ms.Tensor(w)).asnumpy()
    assert got.shape == (6, in_features)
    np.testing.assert_allclose(got, dy.astype(np.float64) @ w, rtol=1e-4, atol=1e-3)


def test_conv2d_in_row_bands_equals_one_pass(monkeypatch):
    rng = np.random.default_rng(1)
    x = ms.Tensor(rng.standard_normal((2, 3, 11, 6)).astype(np.float32))
    w = ms.Tensor(rng.standard_normal((2, 3, 3, 3)).astype(np.float32))
    b = ms.Tensor(np.zeros(2, np.float32))
    whole = backend.conv2d(x, w, b, 2, 1).asnumpy()
    monkeypatch.setattr(backend, "_MAX_UNFOLD_BYTES", 1)  # one output row per band
    banded = backend.conv2d(x, w, b, 2, 1).asnumpy()
    np.testing.assert_allclose(banded, whole, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(whole, _conv_reference(x.asnumpy(), w.asnumpy(), b.asnumpy(), 2, 1), rtol=1e-4, atol=1e-4)


def _conv_input_gradient_reference(upstream, w, input_shape, stride, padding):
    """d(sum(upstream * conv(x))) / dx, scattering each output position back onto its input patch."""
    n, c, h, wd = input_shape
    k = w.shape[-1]
    dxp = np.zeros((n, c, h + 2 * padding, wd + 2 * padding), np.float64)
    for i in range(upstream.shape[2]):
        for j in range(upstream.shape[3]):
            dxp[:, :, i * stride : i * stride + k, j * stride : j * stride + k] += np.einsum(
                "no,ockl->nckl", upstream[:, :, i, j], w
            )
    return dxp[:, :, padding : padding + h, padding : padding + wd]


@pytest.mark.parametrize("stride", [1, 2])
def test_compiled_conv2d_gradient_is_right_on_every_launch(stride):
    # On CPU, ops.pad's gradient kernel went wrong on the second launch of a compiled graph and hung on the third.
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 6, 5)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    b = np.zeros(4, np.float32)
    out_shape = _conv_reference(x, w, b, stride, 1).shape
    upstream = rng.standard_normal(out_shape).astype(np.float32)

    def weighted_sum(x, upstream):
        return (backend.conv2d(x, ms.Tensor(w), ms.Tensor(b), stride, 1) * upstream).sum()

    gradient = ms.jit(ms.grad(weighted_sum))
    expected = _conv_input_gradient_reference(upstream, w, x.shape, stride, 1)
    for _ in range(4):
        got = gradient(ms.Tensor(x), ms.Tensor(upstream)).asnumpy()
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_compiled_pad_gradient_is_right_on_every_launch():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((1, 2, 3, 4)).astype(np.float32)
    upstream = rng.standard_normal((1, 2, 4, 5)).astype(np.float32)

    def weighted_sum(x, upstream):
        return (backend.pad(x, (0, 1, 0, 1)) * upstream).sum()

    gradient = ms.jit(ms.grad(weighted_sum))
    for _ in range(4):
        got = gradient(ms.Tensor(x), ms.Tensor(upstream)).asnumpy()
        np.testing.assert_array_equal(got, upstream[:, :, :3, :4])


def test_group_norm():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 8, 3, 3)).astype(np.float32)
    g, b = rng.standard_normal(8).astype(np.float32), rng.standard_normal(8).astype(np.float32)
    got = backend.group_norm(ms.Tensor(x), 4, ms.Tensor(g), ms.Tensor(b), 1e-5).asnumpy()
    xg = x.reshape(2, 4, -1)
    ref = ((xg - xg.mean(-1, keepdims=True)) / np.sqrt(xg.var(-1, keepdims=True) + 1e-5)).reshape(x.shape)
    np.testing.assert_allclose(got, ref * g.reshape(1, -1, 1, 1) + b.reshape(1, -1, 1, 1), rtol=1e-4, atol=1e-5)


def test_layer_norm():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 5, 16)).astype(np.float32)
    g, b = rng.standard_normal(16).astype(np.float32), rng.standard_normal(16).astype(np.float32)
    got = backend.LayerNormOp(1e-5)(ms.Tensor(x), ms.Tensor(g), ms.Tensor(b)).asnumpy()
    ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * g + b
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_layer_norm_input_grad_matches_central_differences():
    """The hand-written gradient (composed ops on CPU), compiled, against float64 central differences of the
    numpy layer norm, for a weighted upstream (the LayerNorm bias does not enter dx)."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 16)) * 3 + 1
    weight, dy = rng.standard_normal(16), rng.standard_normal((2, 3, 16))
    eps = 1e-5

    def layer_norm(values):
        centered = values - values.mean(-1, keepdims=True)
        return centered / np.sqrt((centered ** 2).mean(-1, keepdims=True) + eps) * weight

    expected = np.zeros_like(x)
    step = 1e-6
    for index in np.ndindex(x.shape):
        shifted = [x.copy(), x.copy()]
        shifted[0][index] += step
        shifted[1][index] -= step
        expected[index] = ((layer_norm(shifted[0]) - layer_norm(shifted[1])) * dy).sum() / (2 * step)
    grad = ms.jit(backend.layer_norm_input_grad(eps))
    got = grad(*(ms.Tensor(a.astype(np.float32)) for a in (x, weight, dy))).asnumpy()
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)


def test_gelu_exact_and_tanh():
    from math import erf

    x = np.linspace(-4, 4, 41).astype(np.float32)
    exact = np.array([0.5 * v * (1 + erf(v / np.sqrt(2))) for v in x])
    tanh = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    np.testing.assert_allclose(backend.gelu(ms.Tensor(x)).asnumpy(), exact, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(backend.gelu(ms.Tensor(x), "tanh").asnumpy(), tanh, rtol=1e-4, atol=1e-5)


def test_silu_pad_and_dropout():
    x = np.linspace(-3, 3, 12).astype(np.float32).reshape(1, 1, 3, 4)
    np.testing.assert_allclose(backend.silu(ms.Tensor(x)).asnumpy(), x / (1 + np.exp(-x)), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(backend.pad(ms.Tensor(x), (0, 1, 0, 1)).asnumpy(), np.pad(x, ((0, 0), (0, 0), (0, 1), (0, 1))))
    np.testing.assert_array_equal(backend.dropout(ms.Tensor(x), 0.5, training=False).asnumpy(), x)
    dropped = backend.dropout(ms.Tensor(np.ones((1000,), np.float32)), 0.5, training=True).asnumpy()
    assert set(np.unique(dropped)) <= {0.0, 2.0} and 300 < (dropped == 0).sum() < 700


def test_attention():
    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal((2, 3, 5, 8)).astype(np.float32) for _ in range(3))
    scores = q @ k.swapaxes(-1, -2) / np.sqrt(8)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    got = backend.attention(ms.Tensor(q), ms.Tensor(k), ms.Tensor(v)).asnumpy()
    np.testing.assert_allclose(got, weights @ v, rtol=1e-4, atol=1e-5)
