import ml_dtypes
import numpy as np
import pytest
import mindspore as ms
from mindspore import ops

from library.layers import Conv2d, Linear, freeze, store_weights_in, weight_init


def _weight_gradient(cell, x):
    grad = ops.grad(lambda inputs: (cell(inputs) ** 2).sum(), grad_position=None, weights=[cell.weight])
    return grad(x)[0].asnumpy()


def test_frozen_layers_give_no_weight_gradient_but_the_same_output():
    rng = np.random.default_rng(0)
    with weight_init(seed=1):
        linear, conv = Linear(6, 5), Conv2d(3, 4, 3, padding=1)
    x_linear = ms.Tensor(rng.standard_normal((2, 6)).astype(np.float32))
    x_conv = ms.Tensor(rng.standard_normal((1, 3, 5, 5)).astype(np.float32))
    before = [linear(x_linear).asnumpy(), conv(x_conv).asnumpy()]
    expected_linear = 2 * (before[0].T @ x_linear.asnumpy())
    np.testing.assert_allclose(_weight_gradient(linear, x_linear), expected_linear, rtol=1e-5, atol=1e-5)
    assert np.abs(_weight_gradient(conv, x_conv)).max() > 0

    freeze(linear)
    freeze(conv)
    assert not linear.weight.requires_grad and not conv.bias.requires_grad
    np.testing.assert_array_equal(linear(x_linear).asnumpy(), before[0])
    np.testing.assert_array_equal(conv(x_conv).asnumpy(), before[1])
    assert not _weight_gradient(linear, x_linear).any()
    assert not _weight_gradient(conv, x_conv).any()


def _res_and_transformer_block():
    from library.sdxl_unet import ResBlock, SpatialTransformer, TimestepEmbedSequential

    with weight_init(seed=3):
        return TimestepEmbedSequential([ResBlock(16, 32, 24, 8), SpatialTransformer(32, 2, 16, 1, 20, 8)])


@pytest.mark.parametrize("dtype", [ms.float16, ms.bfloat16])
def test_half_precision_storage_computes_like_fp32_with_rounded_weights(dtype):
    rng = np.random.default_rng(0)
    stored_half, rounded = _res_and_transformer_block(), _res_and_transformer_block()
    names = [name for name, _ in stored_half.parameters_and_names()]
    bytes_before = sum(p.nbytes for p in stored_half.get_parameters())

    assert store_weights_in(stored_half, dtype) == bytes_before // 2
    assert [name for name, _ in stored_half.parameters_and_names()] == names
    assert {p.dtype for p in stored_half.get_parameters()} == {dtype}
    # The independent computation: fp32 weights rounded to the storage precision by numpy / ml_dtypes.
    numpy_dtype = np.float16 if dtype == ms.float16 else ml_dtypes.bfloat16
    for _, full in rounded.parameters_and_names():
        full.set_data(ms.Tensor(full.asnumpy().astype(numpy_dtype).astype(np.float32)))
    x = ms.Tensor(rng.standard_normal((1, 16, 4, 4)).astype(np.float32))
    emb = ms.Tensor(rng.standard_normal((1, 24)).astype(np.float32))
    context = ms.Tensor(rng.standard_normal((1, 5, 20)).astype(np.float32))
    got = stored_half(x, emb, context)
    assert got.dtype == ms.float32
    np.testing.assert_allclose(got.asnumpy(), rounded(x, emb, context).asnumpy(), rtol=1e-5, atol=1e-5)
