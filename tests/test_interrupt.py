"""Ctrl-C during training saves the LoRA and a resumable state, in one process and under msrun.

MindSpore installs its own SIGINT handler when it compiles a graph (it ends the process with a SIGTERM), so
these run the real trainer in a subprocess, send a real SIGINT once steps are running, and check what is left.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from library.safetensors_io import open_safetensors
from tools.make_demo_dataset import main as make_demo_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_STEPS = 400  # far more than the run gets to: the interrupt ends it


def _dataset(root):
    make_demo_dataset(["--out", str(root / "images")])
    path = root / "dataset.toml"
    path.write_text('[general]\ncaption_extension = ".txt"\n[[datasets]]\nresolution = 64\nbatch_size = 1\n'
                    f'[[datasets.subsets]]\nimage_dir = "{root / "images"}"\n')
    return path


def _train_args(model, dataset, output):
    # no --seed: under msrun the ranks agree on a drawn one
    return ["sdxl_train_network.py", "--pretrained_model_name_or_path", model, "--dataset_config", str(dataset),
            "--output_dir", str(output), "--output_name", "lora", "--network_dim", "4", "--network_alpha", "2",
            "--network_train_unet_only", "--cache_latents", "--cache_text_encoder_outputs",
            "--max_train_steps", str(MAX_STEPS), "--learning_rate", "1e-3"]


def _wait_for_steps(log_path, process, steps=3, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"training ended before it was interrupted:\n{log_path.read_text()[-3000:]}"
        text = log_path.read_text(errors="replace") if log_path.exists() else ""
        done = [int(count) for count in re.findall(rf"(\d+)/{MAX_STEPS} \[", text)]
        if done and max(done) >= steps:
            return
        time.sleep(0.5)
    process.kill()
    pytest.fail(f"no training step within {timeout} s")


def _env():
    bin_dir = os.path.dirname(sys.executable)  # msrun starts its workers with the `python` found on PATH
    return dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""), HF_HUB_OFFLINE="1")


def _check_saved_run(output):
    with open_safetensors(str(output / "lora.safetensors")) as reader:
        metadata = dict(reader.metadata)
        up = [reader.read(key) for key in reader.keys() if "lora_up" in key]
    steps = int(metadata["ss_steps"])
    assert 3 <= steps < MAX_STEPS
    assert max(float(np.abs(weight).max()) for weight in up) > 0  # trained from zeros, so really saved
    assert os.listdir(output / "lora-state")


def test_ctrl_c_saves_the_lora_and_a_resumable_state(tmp_path, tiny_sdxl_files):
    log = tmp_path / "train.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, *_train_args(tiny_sdxl_files["single"], _dataset(tmp_path),
                                                                 tmp_path / "out")],
                                   cwd=REPO, env=_env(), stdout=out, stderr=subprocess.STDOUT)
    _wait_for_steps(log, process)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 130, log.read_text()[-3000:]
    assert "interrupted: saving the LoRA and a resumable state" in log.read_text()
    _check_saved_run(tmp_path / "out")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _msrun_workers(output):
    """PIDs of the worker processes training into `output` (msrun starts them in their own sessions, so a
    terminal's Ctrl-C reaches msrun alone; see README "Several devices")."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
            environ = open(f"/proc/{pid}/environ", "rb").read().decode(errors="replace")
        except OSError:
            continue
        if str(output) in cmdline and "MS_ROLE=MS_WORKER" in environ.split("\0"):
            pids.append(int(pid))
    return pids


def test_interrupting_msrun_workers_saves_once_and_ends_every_rank(tmp_path, tiny_sdxl_files):
    output, logs = tmp_path / "out", tmp_path / "msrun_logs"
    command = [os.path.join(os.path.dirname(sys.executable), "msrun"), "--worker_num=2", "--local_worker_num=2",
               f"--master_port={_free_port()}", "--join=True", f"--log_dir={logs}",
               *_train_args(tiny_sdxl_files["single"], _dataset(tmp_path), output)]
    with open(tmp_path / "msrun.log", "w") as out:
        process = subprocess.Popen(command, cwd=REPO, env=_env(), stdout=out, stderr=subprocess.STDOUT)
    _wait_for_steps(logs / "worker_0.log", process)
    workers = _msrun_workers(output)
    assert len(workers) == 2
    for pid in workers:
        os.kill(pid, signal.SIGINT)
    process.wait(timeout=120)  # msrun itself reports the workers' exit code 130 as a failure
    rank0 = (logs / "worker_0.log").read_text(errors="replace")
    assert "interrupted: saving the LoRA and a resumable state" in rank0, rank0[-3000:]
    assert _msrun_workers(output) == []
    _check_saved_run(output)
