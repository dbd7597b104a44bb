"""Loading LoRA files written the way torch sd-scripts writes them (here with plain numpy + safetensors)
and merging them into the base weights: Linear, 1x1 and 3x3 (also strided) convolutions."""

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

import mindspore as ms
from mindspore import Tensor, ops

from library.layers import weight_init
from library.sdxl_unet import SDXLUNet
from library.text_encoders import build_text_encoder, clip_text_config
from networks.lora import create_network_from_weights
from tools.make_tiny_sdxl import TINY_TE1, TINY_TE2, TINY_UNET
from numpy_conv import numpy_conv2d

# (Kohya name in the SGM layout, its diffusers-layout name, the base weight's parameter path)
MODULES = [
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
     "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
     "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"),
    ("lora_unet_input_blocks_4_0_skip_connection", "lora_unet_down_blocks_1_resnets_0_conv_shortcut",
     "input_blocks.4.0.skip_connection.weight"),
    ("lora_unet_input_blocks_4_0_in_layers_2", "lora_unet_down_blocks_1_resnets_0_conv1",
     "input_blocks.4.0.in_layers.2.weight"),
    ("lora_unet_input_blocks_3_0_op", "lora_unet_down_blocks_0_downsamplers_0_conv", "input_blocks.3.0.op.weight"),
]
TE_MODULE = ("lora_te1_text_model_encoder_layers_0_mlp_fc1", "text_model.encoder.layers.0.mlp.fc1.weight")
RANK, ALPHA, MULTIPLIER = 4, 2.0, 0.7


def build_models(seed=0):
    text_encoders = [build_text_encoder(clip_text_config(**dict(TINY_TE1, vocab_size=1000)), False),
                     build_text_encoder(clip_text_config(**dict(TINY_TE2, vocab_size=1000)), True)]
    with weight_init(seed=seed):
        unet = SDXLUNet(TINY_UNET)
    return text_encoders, unet


def base_weights(models):
    text_encoders, unet = models
    unet_params = dict(unet.parameters_and_names())
    weights = {name: unet_params[path].asnumpy().copy() for name, _, path in MODULES}
    weights[TE_MODULE[0]] = dict(text_encoders[0].parameters_and_names())[TE_MODULE[1]].asnumpy().copy()
    return weights


def write_torch_style_lora(path, models, dtype, with_alpha, diffusers_names=False, seed=0):
    """Each module's lora_down [r, in(, k, k)] and lora_up [out, r(, 1, 1)] as sd-scripts saves them."""
    rng = np.random.default_rng(seed)
    tensors, arrays = {}, {}
    file_names = {sgm: (diffusers if diffusers_names else sgm) for sgm, diffusers, _ in MODULES}
    file_names[TE_MODULE[0]] = TE_MODULE[0]
    for name, base in base_weights(models).items():
        down = (0.2 * rng.standard_normal((RANK, base.shape[1]) + base.shape[2:])).astype(dtype)
        up = (0.2 * rng.standard_normal((base.shape[0], RANK) + (1,) * (base.ndim - 2))).astype(dtype)
        file_name = file_names[name]
        tensors[f"{file_name}.lora_down.weight"] = down
        tensors[f"{file_name}.lora_up.weight"] = up
        if with_alpha:
            tensors[f"{file_name}.alpha"] = np.array(ALPHA, dtype)
        arrays[name] = (down.astype(np.float64), up.astype(np.float64))
    safetensors.numpy.save_file(tensors, str(path))
    return arrays


def expected_delta(down, up, scale):
    """Kohya's merge: Linear up @ down; 1x1 conv the same on squeezed kernels; 3x3 conv
    conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3), i.e. sum_r up[o, r] * down[r, i, y, x]."""
    if down.ndim == 2:
        return up @ down * scale
    if down.shape[2:] == (1, 1):
        return (up[:, :, 0, 0] @ down[:, :, 0, 0])[:, :, None, None] * scale
    return np.einsum("or,rikl->oikl", up[:, :, 0, 0], down) * scale


@pytest.mark.parametrize("dtype,with_alpha,diffusers_names", [
    (np.float16, True, False), (ml_dtypes.bfloat16, False, False), (np.float32, True, True)])
def test_torch_style_file_merges_to_the_expected_delta(tmp_path, dtype, with_alpha, diffusers_names):
    models = build_models()
    before = base_weights(models)
    path = tmp_path / "torch_made.safetensors"
    arrays = write_torch_style_lora(path, models, dtype, with_alpha, diffusers_names)

    network, weights_sd = create_network_from_weights(MULTIPLIER, str(path), None, *models, for_inference=True)
    assert sorted(lora.lora_name for lora in network.loras) == sorted(arrays)
    network.merge_to(*models, weights_sd, ms.float32, "cpu")
    after = base_weights(models)
    alpha = ALPHA if with_alpha else RANK
    for name, (down, up) in arrays.items():
        delta = expected_delta(down, up, MULTIPLIER * alpha / RANK)
        assert np.abs(delta).max() > 0.05
        np.testing.assert_allclose(after[name] - before[name], delta, rtol=1e-4, atol=2e-6, err_msg=name)

    network.unmerge()
    for name, weight in base_weights(models).items():
        np.testing.assert_allclose(weight, before[name], rtol=0, atol=2e-6, err_msg=name)


def test_merged_strided_conv_equals_its_lora_applied_as_two_convolutions(tmp_path):
    """Independent of the delta formula: the merged downsampling conv computes org + up(down(x))."""
    models = build_models()
    _, unet = models
    op = unet.input_blocks[3][0].op
    base, bias = op.weight.asnumpy().astype(np.float64), op.bias.asnumpy()
    arrays = write_torch_style_lora(tmp_path / "l.safetensors", models, np.float32, True)
    network, weights_sd = create_network_from_weights(MULTIPLIER, str(tmp_path / "l.safetensors"), None, *models)
    network.merge_to(*models, weights_sd)

    x = np.random.default_rng(5).standard_normal((1, 32, 8, 8))
    down, up = arrays["lora_unet_input_blocks_3_0_op"]
    lora = numpy_conv2d(numpy_conv2d(x, down, stride=2, padding=1), up, 1, 0)
    expected = numpy_conv2d(x, base, 2, 1) + bias.reshape(1, -1, 1, 1) + lora * MULTIPLIER * ALPHA / RANK
    np.testing.assert_allclose(op(Tensor(x.astype(np.float32))).asnumpy(), expected, rtol=1e-4, atol=1e-4)


def test_merging_gives_what_applying_gives(tmp_path):
    merged_models, applied_models = build_models(), build_models()
    for source, copy in zip(merged_models[0], applied_models[0]):  # mindone initialises text encoders unseeded
        for (_, value), (_, param) in zip(source.parameters_and_names(), copy.parameters_and_names()):
            ops.assign(param, value)
    path = tmp_path / "l.safetensors"
    write_torch_style_lora(path, merged_models, np.float16, True)

    merged, weights_sd = create_network_from_weights(MULTIPLIER, str(path), None, *merged_models)
    merged.merge_to(*merged_models, weights_sd)
    applied, weights_sd = create_network_from_weights(MULTIPLIER, str(path), None, *applied_models)
    applied.apply_to(*applied_models)
    assert applied.load_state_dict(weights_sd) == []
    with pytest.raises(ValueError, match="applied"):
        applied.merge_to(*applied_models, weights_sd)

    rng = np.random.default_rng(6)
    x = Tensor(rng.standard_normal((1, 32, 8, 8)).astype(np.float32))
    emb = Tensor(rng.standard_normal((1, TINY_UNET.time_embed_dim)).astype(np.float32))
    context = Tensor(rng.standard_normal((1, 5, TINY_UNET.context_dim)).astype(np.float32))
    outputs = []
    for _, unet in (merged_models, applied_models):
        h = unet.input_blocks[3](x, emb, context)
        outputs.append(unet.input_blocks[4](h, emb, context).asnumpy())
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-4, atol=1e-4)
    applied.set_multiplier(0.0)
    without_lora = applied_models[1].input_blocks[4](applied_models[1].input_blocks[3](x, emb, context), emb, context)
    assert np.abs(without_lora.asnumpy() - outputs[1]).max() > 1e-2
    applied.set_multiplier(MULTIPLIER)

    ids = Tensor(np.array([[406, 5, 7, 9] + [0] * 73], np.int32))
    hidden = [models[0][0](ids, return_dict=False)[0].asnumpy() for models in (merged_models, applied_models)]
    np.testing.assert_allclose(hidden[0], hidden[1], rtol=1e-4, atol=1e-4)
