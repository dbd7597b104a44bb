"""The unit-by-unit step of --gradient_checkpointing (library/blockwise.py) on the tiny SDXL UNet."""

import numpy as np
import pytest

import mindspore as ms
from mindspore import Parameter, Tensor, ops

from library.blockwise import BlockwiseSDXLLoss, BlockwiseTrainStepForSDXLLoRA, structure_key
from library.errors import UserError
from library.layers import weight_init
from library.optimizers import create_optimizer
from library.sdxl_unet import BasicTransformerBlock, SDXLUNet, SizeEmbedding
from library.train_step import CachedConditioning, SDXLLoRALoss, TrainStepForSDXLLoRA
from networks import lora
from tools.make_tiny_sdxl import TINY_UNET


def _adapted_unet(conv_dim=None):
    with weight_init(seed=0):
        unet = SDXLUNet(TINY_UNET)
    np.random.seed(0)
    kwargs = {} if conv_dim is None else {"conv_dim": conv_dim}
    network = lora.create_network(1.0, 4, 2, None, [], unet, **kwargs)
    network.apply_to([], unet, apply_text_encoder=False, apply_unet=True)
    adapter = {id(p) for p in network.adapter_params()}
    for _, param in unet.parameters_and_names():
        param.requires_grad = id(param) in adapter
    return unet, network


def _randomize_up_matrices(network, rng):
    for module in network.loras:  # non-zero up matrices, so that every LoRA gradient is non-zero
        up = module.lora_up.weight
        up.set_data(Tensor(rng.standard_normal(up.shape).astype(np.float32) * 0.1))


def _step_inputs(rng):
    return (Tensor(rng.standard_normal((2, 4, 16, 16)).astype(np.float32)),
            Tensor(rng.standard_normal((2, 4, 16, 16)).astype(np.float32)),
            Tensor(np.array([500, 20], np.int32)), Tensor(np.array([[128, 128, 0, 0, 128, 128]] * 2, np.float32)),
            Tensor(np.array([1.0, 0.5], np.float32)), Tensor(np.array([0.1, 0.2], np.float32)),
            Tensor(rng.standard_normal((2, 77, TINY_UNET.context_dim)).astype(np.float32)),
            Tensor(rng.standard_normal((2, TINY_UNET.pooled_dim)).astype(np.float32)),
            Tensor(np.zeros((), np.float32)))


@pytest.fixture(scope="module")
def blockwise_and_reference():
    unet, network = _adapted_unet(conv_dim=4)
    rng = np.random.default_rng(1)
    _randomize_up_matrices(network, rng)
    params = network.adapter_params()
    loss_cell = SDXLLoRALoss(unet, CachedConditioning(), "huber")
    inputs = _step_inputs(rng)
    blockwise = BlockwiseSDXLLoss(loss_cell, params)
    upstream = 0.5
    loss, grads = blockwise(Tensor(upstream, ms.float32), *inputs)
    reference_loss, reference_grads = ops.value_and_grad(loss_cell, None, weights=params)(*inputs)
    return {"unet": unet, "blockwise": blockwise, "params": params, "upstream": upstream, "inputs": inputs,
            "loss_cell": loss_cell,
            "loss": loss.asnumpy(), "grads": [g.asnumpy() for g in grads],
            "reference_loss": reference_loss.asnumpy(), "reference_grads": [g.asnumpy() for g in reference_grads]}


def test_unit_gradients_equal_the_whole_model_gradients(blockwise_and_reference):
    run = blockwise_and_reference
    np.testing.assert_allclose(run["loss"], run["reference_loss"], rtol=1e-6)
    assert len(run["grads"]) == len(run["params"]) == 396  # linear and conv LoRA, down and up
    scale = max(np.abs(g).max() for g in run["reference_grads"])
    for param, grad, reference in zip(run["params"], run["grads"], run["reference_grads"]):
        assert grad.shape == reference.shape == tuple(param.shape)
        np.testing.assert_allclose(grad, run["upstream"] * reference, atol=1e-5 * scale, err_msg=param.name)


def test_transformer_blocks_save_activations_up_to_the_budget(blockwise_and_reference):
    """Every transformer block of the fixture's step saved its activations (no recompute); with a smaller
    budget only the first ones do, with none all recompute, and the gradients stay the same."""
    run = blockwise_and_reference
    saved_everything = run["blockwise"].last_saved_bytes
    num_blocks = sum(isinstance(cell, BasicTransformerBlock) for _, cell in run["unet"].cells_and_names())
    assert num_blocks == 11 and saved_everything > 0
    scale = max(np.abs(g).max() for g in run["reference_grads"])
    for budget in (saved_everything // 2, 0):
        blockwise = BlockwiseSDXLLoss(run["loss_cell"], run["params"], max_saved_bytes=budget)
        loss, grads = blockwise(Tensor(run["upstream"], ms.float32), *run["inputs"])
        assert (0 < blockwise.last_saved_bytes < saved_everything) if budget else blockwise.last_saved_bytes == 0
        np.testing.assert_allclose(loss.asnumpy(), run["reference_loss"], rtol=1e-6)
        for param, grad, reference in zip(run["params"], grads, run["reference_grads"]):
            np.testing.assert_allclose(grad.asnumpy(), run["upstream"] * reference, atol=1e-5 * scale,
                                       err_msg=f"{param.name}, budget {budget}")


def test_forward_only_prediction_equals_the_unet(blockwise_and_reference):
    """predict() (sampling under --gradient_checkpointing) runs the same units without a tape."""
    run = blockwise_and_reference
    latents, _, timesteps, sizes, _, _, context, pooled, _ = run["inputs"]
    y = SizeEmbedding()(pooled, sizes)
    expected = run["unet"](latents, timesteps, context, y).asnumpy()
    predicted = run["blockwise"].predict(latents, timesteps, context, y).asnumpy()
    np.testing.assert_allclose(predicted, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    # and the validation loss, forward only
    np.testing.assert_allclose(run["blockwise"].loss(*run["inputs"]).asnumpy(), run["reference_loss"], rtol=1e-6)


def test_blocks_of_the_same_structure_share_one_compiled_unit(blockwise_and_reference):
    unet, blockwise = blockwise_and_reference["unet"], blockwise_and_reference["blockwise"]

    def unit(kind, cell):
        return blockwise._cell_units[(kind, id(cell))][0]

    by_width = {}
    for _, cell in unet.cells_and_names():
        if isinstance(cell, BasicTransformerBlock):
            by_width.setdefault(cell.attn1.to_q.org_module.in_features, set()).add(id(unit("transformer_block", cell)))
    # 5 blocks of 64 channels and 6 of 128 in the tiny UNet: one compiled unit for each width.
    assert {width: len(units) for width, units in by_width.items()} == {64: 1, 128: 1}
    first_res, second_res = unet.input_blocks[1][0], unet.input_blocks[2][0]  # both 32 -> 32 channels
    assert unit("resblock_in", first_res) is unit("resblock_in", second_res)
    assert unit("resblock_out", first_res) is unit("resblock_out", second_res)
    assert unit("resblock_in", first_res) is not unit("resblock_out", first_res)
    assert unit("resblock_in", unet.input_blocks[4][0]) is not unit("resblock_in", unet.input_blocks[5][0])  # 32->64
    assert blockwise.num_compiled_units < len(blockwise._cell_units)


@pytest.mark.parametrize("max_grad_norm", [1e-3, None], ids=["clipped", "unclipped"])
def test_the_step_accumulates_clips_and_updates_like_the_whole_step(max_grad_norm):
    """After the units: accumulation over two micro-batches, clipping to the global norm and the update, against
    mindone's TrainStep running the whole step. SGD with momentum, whose update is proportional to the gradient,
    so that a wrong clipping factor shows (Adam's would mostly cancel it); the gradients' norm is ~0.026 here,
    so a maximum of 1e-3 clips every step."""
    accumulation = 2
    finals = []
    for step_class in (TrainStepForSDXLLoRA, BlockwiseTrainStepForSDXLLoRA):
        unet, network = _adapted_unet()
        rng = np.random.default_rng(4)
        _randomize_up_matrices(network, rng)
        initial = [param.asnumpy().copy() for param in network.adapter_params()]  # asnumpy shares memory on CPU
        groups, _ = network.prepare_optimizer_params(None, None, 1.0)
        optimizer, _, _ = create_optimizer("SGDNesterov", groups, 1.0)
        step = step_class(SDXLLoRALoss(unet, CachedConditioning()), optimizer, max_grad_norm, accumulation)
        run = step.run if isinstance(step, BlockwiseTrainStepForSDXLLoRA) else ms.jit(step.construct)
        for _ in range(2 * accumulation):
            run(*_step_inputs(rng))
        assert int(optimizer.step_count.asnumpy()) == 2
        finals.append([param.asnumpy().copy() for param in network.adapter_params()])
    # Two Nesterov steps move the weights by at most (1.9 + 2.71) * lr * the gradients' norm: clipped, by less
    # than 4.61 * 1e-3; unclipped, by more (the first step alone moves them 1.9 * ~0.026).
    distance = np.sqrt(sum(((final - start) ** 2).sum() for final, start in zip(finals[0], initial)))
    assert 0 < distance < 4.61e-3 if max_grad_norm is not None else distance > 4.61e-3
    moved = max(np.abs(final - start).max() for final, start in zip(finals[0], initial))
    for whole, blockwise, start in zip(*finals, initial):
        np.testing.assert_allclose(blockwise - start, whole - start, rtol=1e-3, atol=1e-3 * moved)


def test_structure_key_ignores_names_but_not_settings():
    blocks = []
    for alpha in (2, 2, 1):
        with weight_init(seed=0):
            block = BasicTransformerBlock(64, 1, 64, 96)
        module = lora.LoRAModule(f"lora_unet_block_{len(blocks)}", block.attn1.to_q, Parameter(Tensor(1.0)), 4, alpha)
        lora.attach(block.attn1, "to_q", module)
        blocks.append(block)
    assert structure_key(blocks[0]) == structure_key(blocks[1])  # only the LoRA module names differ
    assert structure_key(blocks[0]) != structure_key(blocks[2])  # alpha 2 vs 1: another scale
    blocks[1].ff.net[2].bias = Parameter(blocks[1].ff.net[2].bias.astype(ms.float16), name="bias")
    assert structure_key(blocks[0]) != structure_key(blocks[1])  # a weight stored in another dtype


def test_text_encoder_lora_is_refused_by_name():
    unet, network = _adapted_unet()
    outside = Parameter(Tensor(np.zeros((4, 4), np.float32)), name="lora_te1_text_model_encoder_layers_0.lora_up")
    with pytest.raises(UserError, match="--network_train_unet_only"):
        BlockwiseSDXLLoss(SDXLLoRALoss(unet, CachedConditioning()), [*network.adapter_params(), outside])
