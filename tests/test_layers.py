import numpy as np
import mindspore as ms
from mindspore import ops

from library.layers import Conv2d, Linear, freeze, weight_init


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
