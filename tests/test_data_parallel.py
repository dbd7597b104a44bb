"""Data-parallel training under msrun: 2 CPU workers on the tiny SDXL through the real trainer."""

import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from library.diffusion import DiffusionTrainingMath, NoiseSettings
from library.distributed import shard_targets
from library.safetensors_io import open_safetensors
from sdxl_train_network import SdxlNetworkTrainer
from tools.make_demo_dataset import main as make_demo_dataset
from train_network import main as train_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _read(path):
    with open_safetensors(path) as reader:
        return {key: reader.read(key).astype(np.float64) for key in reader.keys()}, dict(reader.metadata)


def _dataset(root, batch_size):
    path = root / f"dataset_b{batch_size}.toml"
    path.write_text('[general]\ncaption_extension = ".txt"\n[[datasets]]\nresolution = 64\n'
                    f'batch_size = {batch_size}\n[[datasets.subsets]]\nimage_dir = "{root / "images"}"\n'
                    'num_repeats = 2\n')
    return path


def _args(model, dataset, output, *extra):
    return ["--pretrained_model_name_or_path", model, "--dataset_config", str(dataset), "--output_dir", str(output),
            "--output_name", "lora", "--network_dim", "4", "--network_alpha", "2", "--network_train_unet_only",
            "--cache_latents", "--cache_latents_to_disk", "--cache_text_encoder_outputs",
            "--cache_text_encoder_outputs_to_disk", "--seed", "3", "--max_train_steps", "3", "--noise_offset", "0.05",
            # an update linear in the gradient: Adam's or clipping's normalisation would hide a gradient
            # summed instead of averaged over ranks
            "--optimizer_type", "SGDNesterov", "--learning_rate", "1.0", "--max_grad_norm", "0", *extra]


def test_two_msrun_workers_train_like_one_process_with_the_doubled_batch(tmp_path, tiny_sdxl_files):
    # Two images of identical content: whichever rank gets which, the global batch holds the same samples
    # as the one-process batch, so only the mechanics (sharding, noise rows, gradient mean) can differ.
    make_demo_dataset(["--out", str(tmp_path / "all")])
    (tmp_path / "images").mkdir()
    for name in ("a", "b"):
        shutil.copy(tmp_path / "all" / "00_red_circle.png", tmp_path / "images" / f"{name}.png")
        (tmp_path / "images" / f"{name}.txt").write_text("a red circle")
    model = tiny_sdxl_files["single"]

    bin_dir = os.path.dirname(sys.executable)  # msrun starts its workers with the `python` found on PATH
    env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""), HF_HUB_OFFLINE="1")
    logs = tmp_path / "msrun_logs"
    command = [os.path.join(bin_dir, "msrun"), "--worker_num=2", "--local_worker_num=2",
               f"--master_port={_free_port()}", "--join=True", f"--log_dir={logs}",
               os.path.join(REPO, "tests", "data_parallel_worker.py"),
               *_args(model, _dataset(tmp_path, 1), tmp_path / "parallel")]
    finished = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    worker_logs = "\n".join(f"--- {name}\n" + (logs / name).read_text()[-3000:]
                            for name in sorted(os.listdir(logs)) if name.startswith("worker"))
    assert finished.returncode == 0, finished.stderr[-2000:] + worker_logs

    # each rank encoded its own share of the cache files, and all of them exist
    assert sorted(p for p in os.listdir(tmp_path / "images") if p.endswith(".npz")) == [
        "a_0064x0064_sdxl.npz", "a_te_outputs.npz", "b_0064x0064_sdxl.npz", "b_te_outputs.npz"]

    rank0, _ = _read(tmp_path / "parallel" / "rank0.safetensors")
    rank1, _ = _read(tmp_path / "parallel" / "rank1.safetensors")
    for key in rank0:
        np.testing.assert_array_equal(rank0[key], rank1[key], err_msg=key)
    saved, metadata = _read(tmp_path / "parallel" / "lora.safetensors")  # rank 0's file, as a user gets it
    assert sorted(os.listdir(tmp_path / "parallel")) == ["lora.safetensors", "rank0.safetensors", "rank1.safetensors"]
    assert metadata["ss_steps"] == "3" and metadata["ss_num_batches_per_epoch"] == "2"

    # the same run in one process with batch 2, reusing the cache files the workers wrote
    train_main(SdxlNetworkTrainer, _args(model, _dataset(tmp_path, 2), tmp_path / "single", "--save_precision",
                                         "float"))
    single, _ = _read(tmp_path / "single" / "lora.safetensors")
    moved = max(float(np.abs(value).max()) for key, value in single.items() if "lora_up" in key)  # from zeros
    assert moved > 1e-3  # training changed the LoRA, so the comparison below compares something
    for key, value in single.items():
        np.testing.assert_allclose(rank0[key], value, rtol=1e-4, atol=1e-4 * moved, err_msg=key)


COUPLED_ROWS = NoiseSettings(multires_noise_iterations=3, ip_noise_gamma=0.1, noise_offset=0.1, adaptive_noise_scale=0.01)


@pytest.mark.parametrize("noise", [NoiseSettings(), NoiseSettings(noise_offset=0.1, adaptive_noise_scale=0.01,
                                                                   min_snr_gamma=5, ip_noise_gamma=0.1),
                                   NoiseSettings(multires_noise_iterations=3, noise_offset=0.1), COUPLED_ROWS])
def test_each_rank_takes_its_rows_of_the_global_draw(noise):
    math = DiffusionTrainingMath(noise)
    latents = np.random.default_rng(0).standard_normal((4, 4, 8, 8)).astype(np.float32)
    weights = np.array([1.0, 0.5, 1.0, 2.0], np.float32)
    whole = math.prepare(latents, weights, np.random.default_rng(5))
    gathered = []

    def sum_over_ranks(stacked):  # what the all-reduce returns: every rank's rows in place
        gathered.append(stacked.copy())
        return latents

    for rank in (0, 1):
        rows = slice(2 * rank, 2 * rank + 2)
        mine = shard_targets(math, latents[rows], weights[rows], np.random.default_rng(5), [(2, 8, 8)] * 2, rank,
                             sum_over_ranks)
        for name in ("noisy_latents", "target", "timesteps", "loss_weights", "huber_c"):
            np.testing.assert_allclose(getattr(mine, name), getattr(whole, name)[rows], rtol=1e-6, atol=1e-6,
                                       err_msg=f"rank {rank} {name}")
    # only coupled rows pay for a gather; each rank then contributes its own rows and zeros elsewhere
    assert len(gathered) == (2 if noise is COUPLED_ROWS else 0)
    if gathered:
        np.testing.assert_array_equal(gathered[0] + gathered[1], latents)


def test_ranks_with_different_buckets_draw_in_step():
    math = DiffusionTrainingMath(NoiseSettings())
    sizes = [(1, 8, 8), (2, 6, 10)]
    generators = [np.random.default_rng(9), np.random.default_rng(9)]
    for rank, generator in enumerate(generators):
        latents = np.ones((sizes[rank][0], 4, *sizes[rank][1:]), np.float32)
        targets = shard_targets(math, latents, np.ones(sizes[rank][0], np.float32), generator, sizes, rank, None)
        assert targets.noisy_latents.shape == latents.shape
    # both ranks consumed the same draws, so the next step starts from the same generator state
    assert generators[0].bit_generator.state == generators[1].bit_generator.state
