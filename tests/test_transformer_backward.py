"""The hand-written transformer-block backward (library/transformer_backward.py) against MindSpore's autodiff."""

import numpy as np
import pytest

import mindspore as ms
from mindspore import Parameter, Tensor, ops

from library.blockwise import _Graph, bind_weight_slots
from library.layers import freeze, store_weights_in, weight_init
from library.sdxl_unet import BasicTransformerBlock
from library.transformer_backward import SavedBackwardBlock, supports_saved_backward
from networks import lora

DIM, HEADS, CONTEXT_DIM, TOKENS = 64, 2, 48, 16
# (parent path, attribute): the projections given a LoRA; the others stay plain frozen Linears.
ADAPTED = (("attn1", "to_q"), ("attn1", "to_v"), ("attn2", "to_k"), ("attn2.to_out", "0"), ("ff.net.0", "proj"))


def _block(base_dtype=None, **lora_kwargs):
    with weight_init(seed=0):
        block = BasicTransformerBlock(DIM, HEADS, DIM // HEADS, CONTEXT_DIM)
    freeze(block)
    if base_dtype is not None:
        store_weights_in(block, base_dtype)
    multiplier = Parameter(Tensor(0.7, ms.float32), name="multiplier", requires_grad=False)
    rng = np.random.default_rng(3)
    np.random.seed(3)
    for index, (parent_path, key) in enumerate(ADAPTED):
        parent = block
        for part in parent_path.split("."):
            parent = parent[int(part)] if part.isdigit() else getattr(parent, part)
        target = parent[int(key)] if key.isdigit() else getattr(parent, key)
        module = lora.LoRAModule(f"lora_{index}", target, multiplier, 4, 2.0, **lora_kwargs)
        up = module.lora_up.weight
        up.set_data(Tensor(rng.standard_normal(up.shape).astype(np.float32) * 0.1))  # a fresh up is zero
        lora.attach(parent, key, module)
    return block


@pytest.mark.parametrize("base_dtype", [None, ms.float16], ids=["fp32", "fp16-stored base"])
def test_saved_backward_equals_autodiff(base_dtype):
    block = _block(base_dtype)
    weights = bind_weight_slots(block)
    trainable = [index for index, param in enumerate(weights) if param.requires_grad]
    assert supports_saved_backward(block, weights) and len(trainable) == 2 * len(ADAPTED)
    saved_block = SavedBackwardBlock(block)
    assert saved_block.grad_slots == tuple(trainable)

    rng = np.random.default_rng(0)
    x = Tensor(rng.standard_normal((2, TOKENS, DIM)).astype(np.float32))
    context = Tensor(rng.standard_normal((2, 7, CONTEXT_DIM)).astype(np.float32))
    upstream = Tensor(rng.standard_normal((2, TOKENS, DIM)).astype(np.float32))
    tensors = tuple(param.data for param in weights)

    def forward(x, context, *weights):
        return saved_block.forward(x, context, weights)

    def backward(upstream, x, context, *saved_and_weights):
        count = SavedBackwardBlock.num_saved
        return saved_block.backward(upstream, x, context, saved_and_weights[:count], saved_and_weights[count:])

    y, *saved = ms.jit(_Graph(forward).construct)(x, context, *tensors)
    assert len(saved) == SavedBackwardBlock.num_saved
    grads = ms.jit(_Graph(backward).construct)(upstream, x, context, *saved, *tensors)

    # The independent computation: the block's own construct and MindSpore's autodiff, in pynative mode.
    expected_y = block(x, context)
    lora_params = [weights[index] for index in trainable]
    expected_dx, expected_dw = ops.grad(lambda x: (block(x, context) * upstream).sum(), 0, lora_params)(x)
    np.testing.assert_allclose(y.asnumpy(), expected_y.asnumpy(), rtol=1e-5, atol=1e-5)
    scale = np.abs(expected_dx.asnumpy()).max()
    np.testing.assert_allclose(grads[0].asnumpy(), expected_dx.asnumpy(), atol=1e-5 * scale)
    assert len(grads) == 1 + len(lora_params)
    for param, grad, expected in zip(lora_params, grads[1:], expected_dw):
        expected = expected.asnumpy()
        assert grad.shape == expected.shape and np.abs(expected).max() > 0, param.name
        np.testing.assert_allclose(grad.asnumpy(), expected, atol=1e-5 * np.abs(expected).max(), err_msg=param.name)


def test_only_plain_lora_blocks_take_the_saved_backward():
    block = _block()
    assert supports_saved_backward(block, bind_weight_slots(block))
    for kwargs in ({"dropout": 0.1}, {"rank_dropout": 0.1}, {"module_dropout": 0.1}):
        block = _block(**kwargs)
        assert not supports_saved_backward(block, bind_weight_slots(block)), kwargs
    block = _block()
    block.norm2.weight.requires_grad = True  # a trainable weight the hand-written backward has no gradient for
    assert not supports_saved_backward(block, bind_weight_slots(block))
    block = _block()
    block.attn1.to_q.lora_up.weight.requires_grad = False  # a LoRA matrix that is not trained
    assert not supports_saved_backward(block, bind_weight_slots(block))
