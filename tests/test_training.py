"""Training on the tiny SDXL through the real trainer, compiled: learning, frozen base, files, resume."""

import json
import os
import shutil

import numpy as np
import pytest

import mindspore as ms

from library.diffusion import DiffusionTrainingMath, NoiseSettings
from library.layers import store_weights_in
from library.lora_metadata import SS_TRAINING_KEYS
from library.optimizers import create_optimizer
from library.safetensors_io import open_safetensors
from library.train_step import CachedConditioning, SDXLLoRALoss, TrainStepForSDXLLoRA
from networks import lora
from sdxl_train_network import SdxlNetworkTrainer
from tools.make_demo_dataset import main as make_demo_dataset
from tools.make_tiny_sdxl import make_tiny_sdxl
from train_network import main as train_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("base_dtype", [None, ms.float16])
def test_loss_falls_on_a_fixed_batch_and_only_lora_changes(base_dtype):
    models = make_tiny_sdxl(seed=0)
    if base_dtype is not None:  # --mixed_precision: frozen weights held in half precision
        store_weights_in(models.unet, base_dtype)
    np.random.seed(0)
    network = lora.create_network(1.0, 8, 4, models.vae, models.text_encoders, models.unet)
    network.apply_to(models.text_encoders, models.unet, apply_text_encoder=False, apply_unet=True)
    adapter = {id(p) for p in network.adapter_params()}
    for _, param in models.unet.parameters_and_names():
        param.requires_grad = id(param) in adapter
    base_before = {n: p.asnumpy().copy() for n, p in models.unet.parameters_and_names() if id(p) not in adapter}
    up_before = {n: p.asnumpy().copy() for n, p in models.unet.parameters_and_names() if id(p) in adapter}

    groups, _ = network.prepare_optimizer_params(None, None, 1e-2)
    optimizer, _, _ = create_optimizer("AdamW", groups, 1e-2)
    step = ms.jit(TrainStepForSDXLLoRA(SDXLLoRALoss(models.unet, CachedConditioning()), optimizer, 1.0).construct)

    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    fixed = DiffusionTrainingMath(NoiseSettings(min_timestep=500, max_timestep=501)).prepare(
        latents, np.ones(2), np.random.default_rng(1))
    context = rng.standard_normal((2, 77, 192)).astype(np.float32)
    pooled = rng.standard_normal((2, 128)).astype(np.float32)
    sizes = np.tile(np.array([[64, 64, 0, 0, 64, 64]], np.float32), (2, 1))
    inputs = [ms.Tensor(a) for a in (fixed.noisy_latents, fixed.target, fixed.timesteps, sizes, fixed.loss_weights,
                                     fixed.huber_c, context, pooled, np.zeros((), np.float32))]
    losses = [float(step(*inputs)[0].asnumpy()) for _ in range(25)]
    assert losses[-1] < 0.8 * losses[0], losses

    for name, param in models.unet.parameters_and_names():
        if id(param) in adapter:
            assert not np.array_equal(param.asnumpy(), up_before[name]), name
        else:
            np.testing.assert_array_equal(param.asnumpy(), base_before[name], err_msg=name)


@pytest.fixture(scope="module")
def demo_setup(tmp_path_factory, tiny_sdxl_files):
    root = tmp_path_factory.mktemp("train")
    make_demo_dataset(["--out", str(root / "images")])
    dataset = root / "dataset.toml"
    dataset.write_text(
        '[general]\ncaption_extension = ".txt"\n[[datasets]]\nresolution = 64\nbatch_size = 2\n'
        f'[[datasets.subsets]]\nimage_dir = "{root / "images"}"\nnum_repeats = 1\n'
    )
    return root, dataset, tiny_sdxl_files["single"]


def _args(root, dataset, model, output, *extra):
    return ["--pretrained_model_name_or_path", model, "--dataset_config", str(dataset),
            "--output_dir", str(root / output), "--output_name", "lora", "--network_dim", "4", "--network_alpha", "2",
            "--network_train_unet_only", "--cache_latents", "--learning_rate", "1e-3", "--seed", "7",
            "--max_train_steps", "4", "--save_precision", "fp16", *extra]


def test_train_save_and_resume_exactly(demo_setup):
    root, dataset, model = demo_setup
    train_main(SdxlNetworkTrainer, _args(root, dataset, model, "full", "--save_every_n_steps", "2", "--save_state"))
    full = root / "full"
    # As sd-scripts: a step checkpoint at every 2nd step (the last one too), the final file, and states.
    assert sorted(os.listdir(full)) == ["lora-state", "lora-step00000002-state", "lora-step00000002.safetensors",
                                        "lora-step00000004-state", "lora-step00000004.safetensors", "lora.safetensors"]
    with open_safetensors(full / "lora.safetensors") as reader:
        assert set(SS_TRAINING_KEYS) <= set(reader.metadata)
        assert reader.metadata["ss_steps"] == "4"
        assert reader.dtype(reader.keys()[0]) == "F16"
        finished = {key: reader.read(key) for key in reader.keys()}
    state = json.loads((full / "lora-step00000002-state" / "train_state.json").read_text())
    assert state["global_step"] == 2

    train_main(SdxlNetworkTrainer, _args(root, dataset, model, "resumed", "--resume",
                                        str(full / "lora-step00000002-state")))
    with open_safetensors(root / "resumed" / "lora.safetensors") as reader:
        assert reader.metadata["ss_steps"] == "4"
        for key, value in finished.items():
            np.testing.assert_array_equal(reader.read(key), value, err_msg=key)


def test_config_file_trains_the_same_as_the_command_line(demo_setup):
    root, dataset, model = demo_setup
    config = root / "args.toml"
    config.write_text(
        f'pretrained_model_name_or_path = "{model}"\ndataset_config = "{dataset}"\noutput_dir = "{root / "from_config"}"\n'
        'output_name = "lora"\nnetwork_dim = 4\nnetwork_alpha = 2\nnetwork_train_unet_only = true\ncache_latents = true\n'
        'learning_rate = 1e-3\nseed = 7\nmax_train_steps = 4\nsave_precision = "fp16"\n'
    )
    train_main(SdxlNetworkTrainer, ["--config_file", str(config)])
    with open_safetensors(root / "from_config" / "lora.safetensors") as a, \
            open_safetensors(root / "full" / "lora.safetensors") as b:
        for key in b.keys():
            np.testing.assert_array_equal(a.read(key), b.read(key), err_msg=key)


def test_gradient_checkpointing_trains_the_same_lora(demo_setup):
    """--gradient_checkpointing runs the unit-by-unit step (library/blockwise.py): same files, same weights up to
    float reassociation and the fp16 rounding of the saved values."""
    root, dataset, model = demo_setup
    prompts = root / "checkpointed_prompts.txt"
    prompts.write_text("a red circle --w 64 --h 64 --s 2 --d 5\n")
    train_main(SdxlNetworkTrainer, _args(root, dataset, model, "checkpointed", "--gradient_checkpointing",
                                         "--sample_prompts", str(prompts), "--sample_every_n_steps", "4"))
    assert len(os.listdir(root / "checkpointed" / "sample")) == 1  # sampled through the same compiled units
    with open_safetensors(root / "checkpointed" / "lora.safetensors") as a, \
            open_safetensors(root / "full" / "lora.safetensors") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        assert a.metadata["ss_gradient_checkpointing"] == "True"
        for key in b.keys():
            np.testing.assert_allclose(a.read(key).astype(np.float32), b.read(key).astype(np.float32),
                                       rtol=5e-3, atol=1e-5, err_msg=key)


@pytest.mark.parametrize("precision, dtype", [("no", ms.float32), ("fp16", ms.float16), ("bf16", ms.bfloat16)])
def test_mixed_precision_holds_the_unet_in_that_precision(demo_setup, precision, dtype):
    from library.train_args import parse_args

    root, dataset, model = demo_setup
    args = parse_args(_args(root, dataset, model, "unused", "--mixed_precision", precision))
    models = SdxlNetworkTrainer().load_target_model(args)
    assert {param.dtype for param in models.unet.get_parameters()} == {dtype}
    assert {param.dtype for param in models.vae.get_parameters()} == {ms.float32}


@pytest.mark.parametrize("extra, fragment", [
    (["--xformers"], "--xformers is not supported"),
    (["--network_module", "networks.lycoris"], "networks.lycoris"),
])
def test_refused_arguments_exit_with_one_line(demo_setup, capsys, extra, fragment):
    root, dataset, model = demo_setup
    with pytest.raises(SystemExit) as info:
        train_main(SdxlNetworkTrainer, _args(root, dataset, model, "refused", *extra))
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0]


def test_missing_image_folder_is_one_line(demo_setup, capsys, tmp_path):
    root, _, model = demo_setup
    dataset = tmp_path / "dataset.toml"
    dataset.write_text(f'[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "{tmp_path / "nowhere"}"\n')
    with pytest.raises(SystemExit) as info:
        train_main(SdxlNetworkTrainer, _args(root, dataset, model, "missing"))
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere" in err[0]


def test_encoders_cached_in_a_child_process_train_the_same_lora(demo_setup, tmp_path, monkeypatch):
    """With both caches and nothing else needing the encoders, the VAE and text encoders run in a child process
    (library/cache_process.py) and the trainer process builds the UNet alone; the LoRA equals the one trained
    with the encoders in-process (same latent samples), here with a validation group cached alongside."""
    import train_network

    root, _, model = demo_setup
    dataset = tmp_path / "dataset.toml"
    dataset.write_text('[general]\ncaption_extension = ".txt"\n[[datasets]]\nresolution = 64\nbatch_size = 2\n'
                       f'validation_split = 0.25\n[[datasets.subsets]]\nimage_dir = "{root / "images"}"\n')
    loaded = []
    load = SdxlNetworkTrainer.load_target_model

    def recording_load(self, args, unet=True, encoders=True):
        loaded.append(load(self, args, unet, encoders))
        return loaded[-1]

    monkeypatch.setattr(SdxlNetworkTrainer, "load_target_model", recording_load)
    extra = ("--cache_text_encoder_outputs", "--validate_every_n_steps", "2")
    train_main(SdxlNetworkTrainer, _args(tmp_path, dataset, model, "child", *extra))
    assert [(m.unet is not None, m.vae, m.text_encoders) for m in loaded] == [(True, None, [])]

    monkeypatch.setattr(train_network, "encoders_needed_after_caching", lambda args: True)
    train_main(SdxlNetworkTrainer, _args(tmp_path, dataset, model, "in_process", *extra))
    assert loaded[1].vae is not None and len(loaded[1].text_encoders) == 2
    with open_safetensors(tmp_path / "child" / "lora.safetensors") as a, \
            open_safetensors(tmp_path / "in_process" / "lora.safetensors") as b:
        assert sorted(a.keys()) == sorted(b.keys()) and len(a.keys()) > 0
        for key in b.keys():
            np.testing.assert_array_equal(a.read(key), b.read(key), err_msg=key)


def test_an_error_in_the_caching_process_is_one_line(demo_setup, capsys, tmp_path):
    root, dataset, model = demo_setup
    with pytest.raises(SystemExit) as info:
        train_main(SdxlNetworkTrainer, _args(root, dataset, model, "bad_vae", "--cache_text_encoder_outputs",
                                             "--vae", str(tmp_path / "no_vae.safetensors")))
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: {tmp_path / 'no_vae.safetensors'}: VAE not found"
