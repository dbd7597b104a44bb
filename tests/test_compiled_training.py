"""The compiled gradient of the tiny SDXL UNet loss, launched repeatedly: every launch must give the same
finite loss and gradients. On MindSpore 2.10 CPU, ops.pad's gradient kernel broke this from the second
launch (wrong values) and hung from the third (see library/backend.py)."""

import faulthandler

import numpy as np

import mindspore as ms

from library.diffusion import DiffusionTrainingMath, NoiseSettings
from library.train_step import CachedConditioning, SDXLLoRALoss
from tools.make_tiny_sdxl import make_tiny_sdxl

LAUNCHES = 5
# A hung kernel spins forever; exit the run with status 1 instead (pytest -s shows every thread's stack).
HANG_LIMIT_SECONDS = 300


def _step_inputs():
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    noised = DiffusionTrainingMath(NoiseSettings()).prepare(latents, np.ones(2), np.random.default_rng(1))
    context = rng.standard_normal((2, 77, 192)).astype(np.float32)
    pooled = rng.standard_normal((2, 128)).astype(np.float32)
    sizes = np.tile(np.array([[64, 64, 0, 0, 64, 64]], np.float32), (2, 1))
    arrays = (noised.noisy_latents, noised.target, noised.timesteps, sizes, noised.loss_weights, noised.huber_c,
              context, pooled, np.zeros((), np.float32))
    return tuple(ms.Tensor(a) for a in arrays)


def test_compiled_unet_gradient_repeats_exactly():
    unet = make_tiny_sdxl(seed=0).unet
    loss_cell = SDXLLoRALoss(unet, CachedConditioning())
    params = unet.trainable_params()
    inputs = _step_inputs()
    eager_loss = float(loss_cell(*inputs).asnumpy())

    value_and_grad = ms.jit(ms.value_and_grad(loss_cell, None, params))
    faulthandler.dump_traceback_later(HANG_LIMIT_SECONDS, exit=True)
    try:
        first_loss, first_grads = _launch(value_and_grad, inputs)
        assert np.isfinite(first_loss)
        np.testing.assert_allclose(first_loss, eager_loss, rtol=1e-5)
        for param, grad in zip(params, first_grads):
            assert np.isfinite(grad).all(), param.name
        # Every convolution pads its input, so a broken pad gradient reaches the input convolution's weight.
        input_conv = next(g for p, g in zip(params, first_grads) if p.name.endswith("input_blocks.0.0.weight"))
        assert np.abs(input_conv).max() > 0
        # Checked launch by launch: the broken kernel gave wrong values one launch before it hung.
        for launch in range(1, LAUNCHES):
            loss, grads = _launch(value_and_grad, inputs)
            assert loss == first_loss, f"launch {launch}"
            for param, grad, first in zip(params, grads, first_grads):
                np.testing.assert_array_equal(grad, first, err_msg=f"launch {launch}: {param.name}")
    finally:
        faulthandler.cancel_dump_traceback_later()


def _launch(value_and_grad, inputs):
    loss, grads = value_and_grad(*inputs)
    return float(loss.asnumpy()), [g.asnumpy() for g in grads]
