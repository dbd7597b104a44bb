"""LoRA network: which cells it adapts and their names, the LoRA cell's math, dropouts, graph mode,
--network_args, optimizer groups, max-norm regularization and the network's metadata."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor, ops

from library.errors import UserError
from library.layers import Conv2d, Linear, weight_init
from library.sdxl_unet import SDXLUNet, UNetConfig
from library.text_encoders import build_text_encoder, clip_text_config
from networks.lora import LoRAModule, create_network, sdxl_block_index
from tools.make_tiny_sdxl import TINY_TE1, TINY_TE2, TINY_UNET
from numpy_conv import numpy_conv2d

REFERENCE = Path(__file__).parent / "reference"

# Module paths sd-scripts adapts, read off the models' own parameter names.
TRANSFORMER_LINEAR = re.compile(
    r"^(.*\.(proj_in|proj_out|attn[12]\.to_[qkv]|attn[12]\.to_out\.0|ff\.net\.0\.proj|ff\.net\.2))\.weight$")
RESNET_AND_SAMPLING = re.compile(
    r"^((input_blocks|middle_block|output_blocks)\..*\.(in_layers\.2|out_layers\.3|emb_layers\.1|skip_connection|op|conv))"
    r"\.weight$")
TEXT_ENCODER_LINEAR = re.compile(r"^(text_model\.encoder\.layers\.\d+\.(self_attn\.[qkvo]\w*_proj|mlp\.fc[12]))\.weight$")


def tiny_text_encoders():
    # A small vocabulary: names and LoRA shapes do not depend on it.
    return [build_text_encoder(clip_text_config(**dict(TINY_TE1, vocab_size=1000)), False),
            build_text_encoder(clip_text_config(**dict(TINY_TE2, vocab_size=1000)), True)]


def tiny_unet(seed=0):
    with weight_init(seed=seed):
        return SDXLUNet(TINY_UNET)


def expected_keys(cell, pattern, prefix, rank, conv_rank=None):
    """{Kohya key: shape} predicted from the model's parameter names and shapes alone."""
    keys = {}
    for name, param in cell.parameters_and_names():
        match = pattern.match(name)
        if not match:
            continue
        shape = tuple(param.shape)
        r = conv_rank if len(shape) == 4 and shape[2:] != (1, 1) else rank
        lora = prefix + match.group(1).replace(".", "_")
        keys[f"{lora}.lora_down.weight"] = (r, shape[1]) + shape[2:]
        keys[f"{lora}.lora_up.weight"] = (shape[0], r) + (1,) * (len(shape) - 2)
        keys[f"{lora}.alpha"] = ()
    return keys


def shapes_of(network):
    return {key: value.shape for key, value in network.state_dict().items()}


def test_tiny_sdxl_keys_and_shapes_follow_the_model_structure():
    text_encoders, unet = tiny_text_encoders(), tiny_unet()
    unet_keys = expected_keys(unet, TRANSFORMER_LINEAR, "lora_unet_", 8)
    # 11 transformers of depth 1 (input 4, middle 1, output 6), each proj_in/out + 10 block linears.
    assert len(unet_keys) == 3 * 11 * 12

    unet_only = create_network(1.0, 8, 4, None, text_encoders, unet)
    unet_only.apply_to(text_encoders, unet, apply_text_encoder=False)
    assert shapes_of(unet_only) == unet_keys
    assert all(module.alpha == 4 and module.scale == 0.5 for module in unet_only.unet_loras)


def test_text_encoder_and_conv_modules_join_when_asked():
    text_encoders, unet = tiny_text_encoders(), tiny_unet()
    expected = expected_keys(unet, TRANSFORMER_LINEAR, "lora_unet_", 8, conv_rank=2)
    conv = expected_keys(unet, RESNET_AND_SAMPLING, "lora_unet_", 8, conv_rank=2)
    # 17 ResBlocks x 3 + 11 skip connections + 2 down- and 2 upsampling convs.
    assert len(conv) == 3 * 66
    expected.update(conv)
    for index, text_encoder in enumerate(text_encoders):
        te_keys = expected_keys(text_encoder, TEXT_ENCODER_LINEAR, f"lora_te{index + 1}_", 8)
        assert len(te_keys) == 3 * 2 * 6  # 2 layers x q, k, v, out_proj, fc1, fc2
        expected.update(te_keys)
    network = create_network(1.0, 8, 4, None, text_encoders, unet, conv_dim="2", conv_alpha="1")
    assert shapes_of(network) == expected
    conv3x3 = network.state_dict()["lora_unet_input_blocks_1_0_in_layers_2.alpha"]
    assert conv3x3 == 1.0 and network.state_dict()["lora_unet_input_blocks_4_0_skip_connection.alpha"] == 4.0
    assert "lora_te2_text_projection.alpha" not in network.state_dict()


def _reference_names(file_name):
    lines = (REFERENCE / file_name).read_text().splitlines()[1:]
    return {line.split("\t")[0] for line in lines}


def test_full_sdxl_names_equal_sd_scripts_files():
    """Names depend on depth, not width: narrow models with SDXL's depths give SDXL's names."""
    with weight_init(skip=True):
        unet = SDXLUNet(UNetConfig(model_channels=32, num_head_channels=32, context_dim=16, adm_in_channels=1552))
    text_encoders = [
        build_text_encoder(clip_text_config(64, 12, 128, 1000, 77, 64, "quick_gelu"), False),
        build_text_encoder(clip_text_config(64, 32, 128, 1000, 77, 64, "gelu"), True),
    ]
    network = create_network(1.0, 8, 4, None, text_encoders, unet)
    assert (len(network.text_encoder_loras), len(network.unet_loras)) == (72 + 192, 722)
    assert set(network.state_dict()) == _reference_names("sdxl-lora-rank8-unet-te-keys.tsv")
    assert len(network.state_dict()) == 2958

    network.apply_to(text_encoders, unet, apply_text_encoder=False)
    assert set(network.state_dict()) == _reference_names("sdxl-lora-rank8-unet-only-keys.tsv")
    assert len(network.state_dict()) == 2166

    with_conv = create_network(1.0, 8, 4, None, [], SDXLUNet(UNetConfig(
        model_channels=32, num_head_channels=32, context_dim=16, adm_in_channels=1552)), conv_dim="4")
    assert len(with_conv.unet_loras) == 788


def block_outputs(unet, seed=0):
    """Outputs of the UNet blocks holding every kind of LoRA target: a strided conv (input_blocks.3), a
    ResBlock with a 1x1 skip and a transformer (input_blocks.4), and an upsampling block (output_blocks.2).
    (The whole tiny UNet takes many seconds per call in PyNative mode on CPU.)"""
    rng = np.random.default_rng(seed)
    config = unet.config
    emb = Tensor(rng.standard_normal((1, config.time_embed_dim)).astype(np.float32))
    context = Tensor(rng.standard_normal((1, 8, config.context_dim)).astype(np.float32))
    x = Tensor(rng.standard_normal((1, 32, 8, 8)).astype(np.float32))
    deep = Tensor(rng.standard_normal((1, 192, 2, 2)).astype(np.float32))
    h = unet.input_blocks[3](x, emb, context)
    return [h.asnumpy(), unet.input_blocks[4](h, emb, context).asnumpy(),
            unet.output_blocks[2](deep, emb, context).asnumpy()]


def test_fresh_network_changes_no_output_bit_for_bit():
    text_encoders, unet = tiny_text_encoders(), tiny_unet()
    ids = Tensor(np.array([[406, 5, 7, 9] + [0] * 73], np.int32))
    before = block_outputs(unet) + [te(ids, return_dict=False)[0].asnumpy() for te in text_encoders]
    network = create_network(1.0, 4, 1, None, text_encoders, unet, conv_dim="4")
    network.apply_to(text_encoders, unet)
    assert sum(isinstance(c, LoRAModule) for _, c in unet.cells_and_names()) == 198
    assert sum(isinstance(c, LoRAModule) for te in text_encoders for _, c in te.cells_and_names()) == 24
    after = block_outputs(unet) + [te(ids, return_dict=False)[0].asnumpy() for te in text_encoders]
    for old, new in zip(before, after):
        assert np.abs(old).mean() > 1e-3
        assert np.array_equal(old, new)


def test_applying_keeps_parameter_names_unique_and_unet_only_leaves_text_encoders_alone():
    text_encoders, unet = tiny_text_encoders(), tiny_unet()
    te_names = [p.name for p in text_encoders[0].get_parameters()]
    network = create_network(1.0, 4, 1, None, text_encoders, unet)
    network.apply_to(text_encoders, unet, apply_text_encoder=False)
    assert network.text_encoder_loras == []
    assert [p.name for p in text_encoders[0].get_parameters()] == te_names
    names = [p.name for p in unet.get_parameters()]
    assert len(names) == len(set(names))
    assert "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight" in names
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in names
    assert [p.name for p in network.adapter_params()][:2] == [
        f"{network.unet_loras[0].lora_name}.lora_down.weight", f"{network.unet_loras[0].lora_name}.lora_up.weight"]
    assert all(p.requires_grad for p in network.adapter_params())
    assert len(network.adapter_params()) == 2 * 132


# ---- The LoRA cell against numpy ------------------------------------------------------------------


def lora_cell(base, rank, alpha, seed=0, **dropouts):
    multiplier = ms.Parameter(Tensor(1.0, ms.float32), name="m", requires_grad=False)
    cell = LoRAModule("lora_test", base, multiplier, rank, alpha, **dropouts)
    rng = np.random.default_rng(seed)
    for param in (cell.lora_down.weight, cell.lora_up.weight):
        ops.assign(param, Tensor(rng.standard_normal(param.shape).astype(np.float32)))
    return cell, multiplier


def test_linear_lora_is_org_plus_scaled_up_down():
    with weight_init(seed=3):
        base = Linear(6, 5)
    cell, multiplier = lora_cell(base, rank=3, alpha=1.5)
    x = np.random.default_rng(1).standard_normal((2, 4, 6)).astype(np.float32)
    w, b = base.weight.asnumpy(), base.bias.asnumpy()
    down, up = cell.lora_down.weight.asnumpy(), cell.lora_up.weight.asnumpy()
    ops.assign(multiplier, Tensor(0.7, ms.float32))
    expected = x @ w.T + b + (x @ down.T @ up.T) * 0.7 * 1.5 / 3
    np.testing.assert_allclose(cell(Tensor(x)).asnumpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel,stride,padding", [(3, 1, 1), (3, 2, 1), (1, 1, 0)])
def test_conv_lora_downs_with_the_original_kernel_and_ups_1x1(kernel, stride, padding):
    with weight_init(seed=4):
        base = Conv2d(3, 4, kernel, stride=stride, padding=padding)
    cell, _ = lora_cell(base, rank=2, alpha=4)
    x = np.random.default_rng(2).standard_normal((2, 3, 7, 7)).astype(np.float32)
    down, up = cell.lora_down.weight.asnumpy(), cell.lora_up.weight.asnumpy()
    assert down.shape == (2, 3, kernel, kernel) and up.shape == (4, 2, 1, 1)
    org = numpy_conv2d(x, base.weight.asnumpy(), stride, padding) + base.bias.asnumpy().reshape(1, -1, 1, 1)
    lora = numpy_conv2d(numpy_conv2d(x, down, stride, padding), up, 1, 0)
    np.testing.assert_allclose(cell(Tensor(x)).asnumpy(), org + lora * 2.0, rtol=1e-4, atol=1e-4)


def test_fresh_lora_down_is_kaiming_uniform_and_up_is_zero():
    with weight_init(seed=5):
        base = Conv2d(16, 8, 3, padding=1)
    np.random.seed(0)
    cell = LoRAModule("lora_x", base, ms.Parameter(Tensor(1.0, ms.float32), name="m"), 64, None)
    down = cell.lora_down.weight.asnumpy()
    bound = 1 / np.sqrt(16 * 9)  # kaiming_uniform(a=sqrt(5)): sqrt(6 / (6 * fan_in))
    assert np.abs(down).max() <= bound and np.abs(down).max() > 0.95 * bound
    assert abs(down.std() - bound / np.sqrt(3)) < 0.05 * bound
    assert not cell.lora_up.weight.asnumpy().any()
    assert cell.alpha == 64 and cell.scale == 1.0  # no alpha means alpha = rank


def test_dropouts_act_in_training_only():
    with weight_init(seed=6):
        base = Linear(3, 2)
    x = Tensor(np.random.default_rng(3).standard_normal((4, 5, 3)).astype(np.float32))
    cell, _ = lora_cell(base, rank=2, alpha=2, module_dropout=0.5)
    org = base(x).asnumpy()
    full = cell(x).asnumpy()
    cell.set_train(False)
    assert np.array_equal(cell(x).asnumpy(), full)
    cell.set_train(True)
    seen = set()
    for _ in range(40):
        out = cell(x).asnumpy()
        is_org, is_full = np.allclose(out, org, atol=1e-6), np.allclose(out, full, atol=1e-6)
        assert is_org or is_full
        seen.add(is_full)
    assert seen == {True, False}

    # Rank dropout keeps a random subset of ranks per sample (the same for all its tokens), scaled by 1/(1-p).
    cell, _ = lora_cell(base, rank=2, alpha=2, rank_dropout=0.5)
    down, up = cell.lora_down.weight.asnumpy(), cell.lora_up.weight.asnumpy()
    per_rank = [(x.asnumpy() @ down[r:r + 1].T) @ up[:, r:r + 1].T for r in range(2)]
    subsets = [0 * per_rank[0], 2 * per_rank[0], 2 * per_rank[1], 2 * (per_rank[0] + per_rank[1])]
    cell.set_train(True)
    for _ in range(10):
        lora = cell(x).asnumpy() - org
        for sample in range(4):
            assert any(np.allclose(lora[sample], s[sample], atol=1e-5) for s in subsets)

    # Neuron dropout zeroes single elements of down(x) and doubles the others (p = 0.5).
    cell, _ = lora_cell(base, rank=2, alpha=2, dropout=0.5)
    ops.assign(cell.lora_up.weight, Tensor(np.eye(2, dtype=np.float32)))
    lx = x.asnumpy() @ cell.lora_down.weight.asnumpy().T
    cell.set_train(True)
    lora = cell(x).asnumpy() - org
    kept = np.isclose(lora, 2 * lx, atol=1e-5)
    assert np.all(kept | np.isclose(lora, 0, atol=1e-6)) and 0 < kept.mean() < 1

    # All three compile in graph mode; a dropped module leaves exactly the original output.
    cell, _ = lora_cell(base, rank=2, alpha=2, dropout=0.5, rank_dropout=0.5, module_dropout=0.5)
    cell.set_train(True)
    compiled = ms.jit(cell.construct)
    outputs = [compiled(x).asnumpy() for _ in range(12)]
    assert any(np.allclose(out, org, rtol=0, atol=1e-6) for out in outputs)
    assert any(np.abs(out - org).max() > 1e-3 for out in outputs)


# ---- Graph mode -----------------------------------------------------------------------------------


def test_compiled_block_reads_the_multiplier_at_run_time_and_trains_only_adapters():
    text_encoders, unet = tiny_text_encoders(), tiny_unet()
    network = create_network(1.0, 4, 4, None, text_encoders, unet, conv_dim="4")
    network.apply_to(text_encoders, unet, apply_text_encoder=False)
    block = unet.input_blocks[4]  # a ResBlock (3x3, 1x1 and emb LoRA) and a transformer (linear LoRA)
    rng = np.random.default_rng(4)
    x = Tensor(rng.standard_normal((1, 32, 8, 8)).astype(np.float32))
    emb = Tensor(rng.standard_normal((1, unet.config.time_embed_dim)).astype(np.float32))
    context = Tensor(rng.standard_normal((1, 5, unet.config.context_dim)).astype(np.float32))
    block_loras = [lora for lora in network.unet_loras if lora.lora_name.startswith("lora_unet_input_blocks_4_")]
    block_params = [p for lora in block_loras for p in (lora.lora_down.weight, lora.lora_up.weight)]
    assert len(block_loras) == 4 + 12

    def loss(x, emb, context):
        return (block(x, emb, context) ** 2).mean()

    grad = ms.jit(ms.value_and_grad(loss, None, block_params))
    _, grads = grad(x, emb, context)
    for param, g in zip(block_params, grads):
        g = g.asnumpy()
        # With lora_up = 0 nothing reaches lora_down yet; lora_up gets a gradient everywhere.
        assert (not g.any()) if "lora_down" in param.name else np.abs(g).sum() > 0, param.name

    for lora in block_loras:
        ops.assign(lora.lora_up.weight, Tensor(rng.standard_normal(lora.lora_up.weight.shape).astype(np.float32)))
    _, grads = grad(x, emb, context)
    assert all(np.abs(g.asnumpy()).sum() > 0 for g in grads)

    forward = ms.jit(block.construct)
    outputs = {}
    for multiplier in (0.0, 0.5, 1.0):
        network.set_multiplier(multiplier)
        outputs[multiplier] = forward(x, emb, context).asnumpy()
        np.testing.assert_allclose(outputs[multiplier], block(x, emb, context).asnumpy(), rtol=1e-4, atol=1e-4)
    assert network.multiplier == 1.0
    assert np.abs(outputs[1.0] - outputs[0.0]).max() > 1e-2
    # Each LoRA adds multiplier * delta, so the block output moves monotonically between the two.
    assert np.abs(outputs[0.5] - outputs[0.0]).mean() < np.abs(outputs[1.0] - outputs[0.0]).mean()


# ---- --network_args -------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,message", [
    ({"algo": "locon"}, "unknown key 'algo'"),
    ({"down_lr_weight": "1,1,1"}, "'down_lr_weight'.*not supported"),
    ({"conv_dim": "four"}, "conv_dim=four"),
    ({"block_dims": "4,4"}, "block_dims must have 23 values"),
    ({"conv_block_dims": ",".join(["4"] * 23)}, "conv_block_dims needs block_dims"),
    ({"conv_alpha": "2"}, "conv_alpha needs conv_dim"),
    ({"dropout": "0.1"}, "dropout=0.1 is not read.*--network_dropout"),
])
def test_bad_network_args_name_the_key(kwargs, message):
    with pytest.raises(UserError, match=message):
        create_network(1.0, 4, 1, None, [], tiny_unet(), **kwargs)


def test_block_dims_set_ranks_per_sdxl_block():
    text_encoders, unet = tiny_text_encoders(), tiny_unet()
    dims = list(range(1, 24))
    dims[8] = 0  # input_blocks_8 gets no LoRA
    network = create_network(1.0, 4, 1, None, text_encoders, unet, block_dims=",".join(map(str, dims)),
                             block_alphas=",".join(str(d / 2) for d in range(1, 24)),
                             conv_block_dims=",".join(["3"] * 23), dropout=None)
    ranks = {lora.lora_name: (lora.lora_dim, lora.alpha) for lora in network.loras}
    assert ranks["lora_unet_input_blocks_4_1_proj_in"] == (6, 3.0)  # block 1 + 4
    assert ranks["lora_unet_middle_block_1_proj_out"] == (12, 6.0)
    assert ranks["lora_unet_output_blocks_3_1_transformer_blocks_0_ff_net_2"] == (17, 8.5)
    assert ranks["lora_unet_output_blocks_3_0_in_layers_2"] == (3, 1.0)  # conv_alpha defaults to 1
    assert ranks["lora_unet_output_blocks_3_0_emb_layers_1"] == (17, 8.5)
    assert not any(name.startswith("lora_unet_input_blocks_7_1") for name in ranks)
    assert "lora_unet_input_blocks_7_0_in_layers_2" in ranks
    assert ranks["lora_te2_text_model_encoder_layers_1_mlp_fc2"] == (4, 1.0)  # text encoders keep network_dim
    assert [sdxl_block_index(n) for n in ("lora_unet_input_blocks_1_0_x", "lora_unet_middle_block_2_x",
                                           "lora_unet_output_blocks_8_x")] == [2, 12, 21]


# ---- Optimizer groups -----------------------------------------------------------------------------


def group_table(groups, descriptions):
    return [(d, g["lr"], len(g["params"])) for g, d in zip(groups, descriptions)]


def test_optimizer_groups_follow_sd_scripts_including_lora_plus():
    text_encoders, unet = tiny_text_encoders(), tiny_unet()
    network = create_network(1.0, 4, 1, None, text_encoders, unet)  # 24 TE modules, 132 UNet modules
    assert group_table(*network.prepare_optimizer_params(None, 2e-4, 1e-4)) == [
        ("textencoder", 1e-4, 48), ("unet", 2e-4, 264)]
    assert group_table(*network.prepare_optimizer_params(0, None, 1e-4)) == [("unet", 1e-4, 264)]

    network = create_network(1.0, 4, 1, None, text_encoders, unet, loraplus_lr_ratio="16",
                             loraplus_text_encoder_lr_ratio="4")
    groups, descriptions = network.prepare_optimizer_params(1e-5, 1e-4, 1e-3)
    assert group_table(groups, descriptions) == [
        ("textencoder", 1e-5, 24), ("textencoder plus", 4e-5, 24), ("unet", 1e-4, 132), ("unet plus", 1.6e-3, 132)]
    assert all("lora_up" in p.name for p in groups[3]["params"])
    assert all("lora_down" in p.name for p in groups[2]["params"])


# ---- Max-norm regularization ----------------------------------------------------------------------


def test_max_norm_regularization_matches_numpy():
    only_input_block_4 = ",".join("{}" if block == 5 else "0" for block in range(23))
    # Linear, 1x1 (skip_connection) and 3x3 modules of one UNet block, to keep the test quick.
    network = create_network(1.0, 4, 2, None, [], tiny_unet(), block_dims=only_input_block_4.format(4),
                             conv_block_dims=only_input_block_4.format(2))
    assert len(network.loras) == 16
    rng = np.random.default_rng(7)
    for lora in network.loras:
        spread = rng.uniform(0.01, 1.0)  # some modules below the limit, most above
        for param in (lora.lora_down.weight, lora.lora_up.weight):
            ops.assign(param, Tensor((spread * rng.standard_normal(param.shape)).astype(np.float32)))
    before = network.state_dict()
    max_norm = 1.0

    expected_scaled, expected_norms, expected_state = 0, [], {}
    for lora in network.loras:
        down = before[f"{lora.lora_name}.lora_down.weight"].astype(np.float64)
        up = before[f"{lora.lora_name}.lora_up.weight"].astype(np.float64)
        delta = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1) * lora.alpha / lora.lora_dim
        norm = np.linalg.norm(delta)
        ratio = min(1.0, max_norm / norm)
        expected_scaled += ratio < 1
        expected_norms.append(norm * ratio)
        expected_state[f"{lora.lora_name}.lora_down.weight"] = down * np.sqrt(ratio)
        expected_state[f"{lora.lora_name}.lora_up.weight"] = up * np.sqrt(ratio)

    keys_scaled, mean_norm, largest = network.apply_max_norm_regularization(max_norm, "cpu")
    assert 0 < keys_scaled == expected_scaled < len(network.loras)
    assert mean_norm == pytest.approx(np.mean(expected_norms), rel=1e-5)
    assert largest == pytest.approx(max(expected_norms), rel=1e-5)
    after = network.state_dict()
    for key, value in expected_state.items():
        np.testing.assert_allclose(after[key], value, rtol=1e-5, atol=1e-7)


# ---- Metadata -------------------------------------------------------------------------------------


def test_network_metadata_is_what_sd_scripts_writes():
    unet = tiny_unet()
    # sd-scripts' trainer: network_dim None and network_alpha 1 by default, and it adds "dropout" itself.
    plain = create_network(1.0, None, 1, None, [], unet, neuron_dropout=None, dropout=None)
    assert plain.metadata() == {
        "ss_network_module": "networks.lora",
        "ss_network_dim": "None",
        "ss_network_alpha": "1",
        "ss_network_dropout": "None",
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_v2": "False",
    }
    assert plain.unet_loras[0].lora_dim == 4 and plain.unet_loras[0].alpha == 1.0

    with_args = create_network(1.0, 16, 8.0, None, [], unet, neuron_dropout=0.1, conv_dim="4", conv_alpha="2",
                               dropout=0.1)
    metadata = with_args.metadata()
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"], metadata["ss_network_dropout"]) == (
        "16", "8.0", "0.1")
    assert metadata["ss_network_args"] == '{"conv_dim": "4", "conv_alpha": "2", "dropout": 0.1}'
    assert json.loads(metadata["ss_network_args"])["conv_alpha"] == "2"
