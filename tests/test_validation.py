"""Validation as sd-scripts: the held-out split (sizes, seed, never trained on) and the validation loss
(the training loss cell at fixed timesteps and fixed noise)."""

import argparse
import math
import random
import textwrap
from dataclasses import replace

import numpy as np
import pytest

import mindspore as ms

from library.dataset_args import add_dataset_arguments
from library.diffusion import TrainingTargets
from library.errors import UserError
from library.train_args import parse_args as parse_training_args
from library.train_dataset import build_dataset_group
from sdxl_train_network import SdxlNetworkTrainer
from train_network import check_validation_args, validation_timesteps
from image_files import make_image


def dataset_args(config_path, seed=1234):
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser)
    args = parser.parse_args(["--dataset_config", str(config_path), "--max_data_loader_n_workers", "0"])
    args.seed = seed
    return args


def image_folder(root, name, count):
    (root / name).mkdir()
    for index in range(count):
        make_image(str(root / name / f"{index:02d}.png"), 64, 64, seed=index)
        (root / name / f"{index:02d}.txt").write_text(f"{name} {index}")
    return root / name


def dataset_config(root, text):
    path = root / "dataset.toml"
    path.write_text(textwrap.dedent(text))
    return path


def paths(group):
    return sorted(item.path for _, item in group.image_items()) if group else []


@pytest.mark.parametrize("count, split, expected", [
    (10, 0.2, (8, 2)),
    (8, 0.3, (6, 2)),  # training keeps ceil(8 * 0.7) = 6, as sd-scripts
    (7, 0.5, (4, 3)),
    (8, 0.1, (8, 0)),  # ceil(7.2) = 8: nothing left to hold out, so no validation
])
def test_split_sizes(tmp_path, count, split, expected):
    folder = image_folder(tmp_path, "images", count)
    config = dataset_config(tmp_path, f"""
        [[datasets]]
        resolution = 64
        validation_split = {split}
        [[datasets.subsets]]
        image_dir = "{folder}"
    """)
    group = build_dataset_group(dataset_args(config))
    assert (len(paths(group)), len(paths(group.validation))) == expected
    assert group.metadata()["ss_num_validation_images"] == expected[1]


def test_split_is_pythons_seeded_shuffle_and_validation_seed_wins(tmp_path):
    folder = image_folder(tmp_path, "images", 10)
    config = dataset_config(tmp_path, f"""
        [[datasets]]
        resolution = 64
        validation_split = 0.3
        [[datasets.subsets]]
        image_dir = "{folder}"
    """)
    shuffled = sorted(str(p) for p in folder.glob("*.png"))
    random.Random(1234).shuffle(shuffled)
    held_out = paths(build_dataset_group(dataset_args(config, seed=1234)).validation)
    assert held_out == sorted(shuffled[math.ceil(10 * 0.7):])
    assert paths(build_dataset_group(dataset_args(config, seed=1234)).validation) == held_out
    assert paths(build_dataset_group(dataset_args(config, seed=99)).validation) != held_out

    seeded = dataset_config(tmp_path, config.read_text().replace("validation_split", "validation_seed = 5\nvalidation_split"))
    by_seed = [paths(build_dataset_group(dataset_args(seeded, seed=seed)).validation) for seed in (1, 2)]
    assert by_seed[0] == by_seed[1]


def test_held_out_images_never_reach_training_batches_and_reg_images_are_not_split(tmp_path):
    train_folder, reg_folder = image_folder(tmp_path, "train", 9), image_folder(tmp_path, "reg", 4)
    config = dataset_config(tmp_path, f"""
        [[datasets]]
        resolution = 64
        batch_size = 2
        validation_split = 0.25
        [[datasets.subsets]]
        image_dir = "{train_folder}"
        [[datasets.subsets]]
        image_dir = "{reg_folder}"
        is_reg = true
    """)
    group = build_dataset_group(dataset_args(config))
    held_out = set(paths(group.validation))
    assert len(held_out) == 2 and all("/train/" in path for path in held_out)
    trained = {path for epoch in (1, 2, 3) for batch in group.iter_epoch(epoch) for path in batch.image_paths}
    assert not trained & held_out
    assert trained | held_out == {str(p) for p in (*train_folder.glob("*.png"), *reg_folder.glob("*.png"))}


@pytest.mark.parametrize("option, message", [
    ("validation_split = 1.0", "validation_split must be at least 0 and below 1"),
    ("validation_split = -0.1", "validation_split must be at least 0 and below 1"),
])
def test_bad_split_is_one_line(tmp_path, option, message):
    folder = image_folder(tmp_path, "images", 2)
    config = dataset_config(tmp_path, f"""
        [[datasets]]
        resolution = 64
        {option}
        [[datasets.subsets]]
        image_dir = "{folder}"
    """)
    with pytest.raises(UserError, match=message):
        build_dataset_group(dataset_args(config))


def test_validation_arguments_need_held_out_images():
    args = argparse.Namespace(validate_every_n_steps=10, validate_every_n_epochs=None, max_validation_steps=None,
                              validation_seed=None)
    with pytest.raises(UserError, match="--validate_every_n_steps needs held-out images"):
        check_validation_args(args, None)


def test_fixed_timesteps_are_sd_scripts():
    args = argparse.Namespace(min_timestep=None, max_timestep=None)
    assert validation_timesteps(args) == [200, 400, 600, 800]
    args = argparse.Namespace(min_timestep=100, max_timestep=900)
    assert validation_timesteps(args) == [260, 420, 580, 740]


def test_validation_loss_is_the_loss_cell_at_fixed_timesteps_and_noise(tmp_path, tiny_sdxl_files):
    folder = image_folder(tmp_path, "images", 4)
    config = dataset_config(tmp_path, f"""
        [[datasets]]
        resolution = 64
        batch_size = 1
        validation_split = 0.5
        [[datasets.subsets]]
        image_dir = "{folder}"
    """)
    args = parse_training_args([
        "--pretrained_model_name_or_path", tiny_sdxl_files["single"], "--output_dir", str(tmp_path / "out"),
        "--dataset_config", str(config), "--network_dim", "4", "--network_train_unet_only", "--cache_latents",
        "--cache_text_encoder_outputs", "--seed", "5", "--max_validation_steps", "1",
        "--max_data_loader_n_workers", "0",
    ])
    trainer = SdxlNetworkTrainer()
    group = build_dataset_group(args)
    models = trainer.load_target_model(args)
    trainer.cache_latents_if_needed(args, models, group.validation)
    trainer.cache_text_encoder_outputs_if_needed(args, models, group.validation)
    network = trainer.create_network(args, models, True, False)
    rng = np.random.default_rng(0)
    for param in network.adapter_params():  # a LoRA that changes the output (lora_up starts at zero)
        param.set_data(ms.Tensor(rng.standard_normal(param.shape).astype(np.float32) * 0.1))
    loss_cell = trainer.build_loss_cell(args, models, False)
    trainer.loss_cell, trainer.forward_loss = loss_cell, ms.jit(loss_cell.construct)

    validated = trainer.validation_loss(args, models, group.validation)

    # by hand: the first held-out batch only (--max_validation_steps 1), noise drawn from --seed in order,
    # noised with SDXL's scaled-linear schedule; the four timesteps as one batch of four through the eager
    # loss cell (its batch mean is the mean of the four single-sample losses)
    batch = next(group.validation.iter_epoch(1))
    latents = batch.latents * 0.13025
    alphas_cumprod = np.cumprod(1 - np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2)
    noise_rng = np.random.default_rng(5)
    timesteps = np.array([200, 400, 600, 800], np.int32)
    noise = np.concatenate([noise_rng.standard_normal(latents.shape).astype(np.float32) for _ in timesteps])
    bar = alphas_cumprod[timesteps].reshape(-1, 1, 1, 1)
    noisy = (np.sqrt(bar) * latents + np.sqrt(1 - bar) * noise).astype(np.float32)
    four = replace(batch, captions=batch.captions * 4, **{
        name: np.repeat(getattr(batch, name), 4, axis=0)
        for name in ("latents", "original_sizes_hw", "crop_top_lefts", "target_sizes_hw", "loss_weights")})
    four.text_encoder_outputs = tuple(np.repeat(array, 4, axis=0) for array in batch.text_encoder_outputs)
    targets = TrainingTargets(noisy, noise, timesteps, np.ones(4, np.float32), np.ones(4, np.float32))
    by_hand = float(loss_cell(*trainer.step_inputs(args, four, four.latents, targets)).asnumpy())
    assert validated == pytest.approx(by_hand, rel=1e-5)
