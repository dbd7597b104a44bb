"""Torch sd-scripts and this trainer on the same machine, same files, same arguments, runs interleaved.

    python benchmarks/side_by_side.py --sd_scripts ../sd-scripts --torch_python ../torch-venv/bin/python \
        --checkpoint sdxl.safetensors --dataset_config dataset.toml --repeats 2

Each repeat runs both trainers once, alternating which goes first (torch, ours, ours, torch, ...), because
these shared 2-core machines drift by tens of percent within minutes: a ratio is only meaningful between
neighbouring runs. Per run it prints the first step's seconds (compilation, for us), seconds per step over
steps 2..N from the progress bar's elapsed time, and the peak RSS and anonymous RSS of the process tree
(sampled from /proc, so the text encoders, the VAE and a caching child count); then the medians and their
ratios. Both trainers get sd-scripts' arguments for the issue's setting (rank 8, UNet only, cached latents
and text-encoder outputs, AdamW, fp32); sd-scripts adds `--sdpa` and loads inline, ours adds
`--gradient_checkpointing` (our whole-step graph does not fit 24 GiB at full size).
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON_ARGS = ["--output_name", "lora", "--network_module", "networks.lora", "--network_dim", "8",
               "--network_alpha", "4", "--network_train_unet_only", "--cache_latents",
               "--cache_text_encoder_outputs", "--learning_rate", "1e-4", "--optimizer_type", "AdamW",
               "--mixed_precision", "no", "--seed", "0"]
TORCH_ARGS = ["--sdpa", "--max_data_loader_n_workers", "0"]
OURS_ARGS = ["--gradient_checkpointing"]
# tqdm's bar: "steps:  38%|███▊      | 3/8 [00:45<01:15, ..." -> (3, 45 s)
_PROGRESS = re.compile(r"steps:\s+\d+%\|[^|]*\|\s*(\d+)/\d+ \[(?:(\d+):)?(\d+):(\d+)")


def elapsed_at_each_step(log: str) -> Dict[int, int]:
    """{step: seconds elapsed when the progress bar first showed it} from a trainer's output."""
    elapsed = {}
    for step, hours, minutes, seconds in _PROGRESS.findall(log):
        elapsed.setdefault(int(step), int(hours or 0) * 3600 + int(minutes) * 60 + int(seconds))
    return elapsed


def step_times(log: str) -> Tuple[Optional[int], Optional[float]]:
    """(seconds to the end of step 1, mean seconds per step over steps 2..N) from a trainer's output."""
    elapsed = elapsed_at_each_step(log)
    if 1 not in elapsed:
        return None, None
    last = max(elapsed)
    per_step = (elapsed[last] - elapsed[1]) / (last - 1) if last > 1 else None
    return elapsed[1], per_step


def _process_tree(pid: int) -> List[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as file:
            children = [int(child) for child in file.read().split()]
    except OSError:
        return [pid]
    return [pid] + [descendant for child in children for descendant in _process_tree(child)]


def _resident_kib(pid: int) -> Tuple[int, int]:
    rss = anonymous = 0
    try:
        with open(f"/proc/{pid}/status") as file:
            for line in file:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("RssAnon:"):
                    anonymous = int(line.split()[1])
    except OSError:
        pass
    return rss, anonymous


def run_measured(command: List[str], cwd: str, log_path: str, interval: float) -> dict:
    """Run `command`, its output to `log_path`; -> figures of the run (peaks in GiB)."""
    peak_rss = peak_anonymous = 0
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                   env=dict(os.environ, HF_HUB_OFFLINE="1"))
        while process.poll() is None:
            sizes = [_resident_kib(pid) for pid in _process_tree(process.pid)]
            peak_rss = max(peak_rss, sum(rss for rss, _ in sizes))
            peak_anonymous = max(peak_anonymous, sum(anonymous for _, anonymous in sizes))
            time.sleep(interval)
    with open(log_path, errors="replace") as log:
        first, per_step = step_times(log.read())
    return {"returncode": process.returncode, "first_step": first, "s_per_step": per_step,
            "peak_rss": peak_rss / 2**20, "peak_anonymous": peak_anonymous / 2**20}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sd_scripts", required=True, help="a checkout of kohya-ss/sd-scripts")
    parser.add_argument("--torch_python", required=True, help="the Python of sd-scripts' environment")
    parser.add_argument("--checkpoint", required=True,
                        help="an SDXL single file (benchmarks/full_size_load.py --write)")
    parser.add_argument("--dataset_config", required=True, help="images at 256 px, batch 1, no buckets")
    parser.add_argument("--tokenizer_cache_dir", help="for sd-scripts without internet (its CLIP tokenizers)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between memory samples")
    parser.add_argument("--work_dir", default=None, help="logs and outputs (default: a temporary folder)")
    args = parser.parse_args(argv)

    for path, what in ((os.path.join(args.sd_scripts, "sdxl_train_network.py"), "--sd_scripts: no sd-scripts checkout"),
                       (args.torch_python, "--torch_python: no Python"), (args.checkpoint, "--checkpoint: no file"),
                       (args.dataset_config, "--dataset_config: no file")):
        if not os.path.isfile(path):
            sys.exit(f"{what} at {path}")
    work_dir = args.work_dir or tempfile.mkdtemp(prefix="side_by_side_")
    os.makedirs(work_dir, exist_ok=True)
    common = ["--pretrained_model_name_or_path", os.path.abspath(args.checkpoint),
              "--dataset_config", os.path.abspath(args.dataset_config),
              "--max_train_steps", str(args.steps)] + COMMON_ARGS
    torch_extra = TORCH_ARGS + (["--tokenizer_cache_dir", args.tokenizer_cache_dir] if args.tokenizer_cache_dir else [])
    trainers = {  # tag: (name, command, working directory)
        "torch": ("torch sd-scripts", [args.torch_python, "sdxl_train_network.py"] + common + torch_extra,
                  args.sd_scripts),
        "ours": ("this trainer", [sys.executable, "sdxl_train_network.py"] + common + OURS_ARGS, REPO),
    }
    results: Dict[str, List[dict]] = {name: [] for name in trainers}
    print("| run | trainer | first step (s) | s/step (steps 2-N) | peak RSS (GiB) | peak anonymous (GiB) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for repeat in range(args.repeats):
        order = list(trainers) if repeat % 2 == 0 else list(reversed(trainers))
        for tag in order:
            name, command, cwd = trainers[tag]
            run_tag = f"{len(results[tag]) + 1}_{tag}"
            output_dir = os.path.join(work_dir, f"out_{run_tag}")
            log_path = os.path.join(work_dir, f"{run_tag}.log")
            figures = run_measured(command + ["--output_dir", output_dir], cwd, log_path, args.interval)
            if figures["returncode"] != 0 or figures["s_per_step"] is None:
                sys.exit(f"{name} failed (exit {figures['returncode']}); see {log_path}")
            results[tag].append(figures)
            run_number = sum(len(runs) for runs in results.values())
            print(f"| {run_number} | {name} | {figures['first_step']} | {figures['s_per_step']:.2f} | "
                  f"{figures['peak_rss']:.2f} | {figures['peak_anonymous']:.2f} |", flush=True)

    medians = {tag: {key: statistics.median(run[key] for run in runs)
                     for key in ("s_per_step", "peak_rss", "peak_anonymous")} for tag, runs in results.items()}
    ours, torch = medians["ours"], medians["torch"]
    print(f"\nmedians: torch {torch['s_per_step']:.2f} s/step, {torch['peak_rss']:.2f} GiB RSS, "
          f"{torch['peak_anonymous']:.2f} GiB anonymous; ours {ours['s_per_step']:.2f} s/step, "
          f"{ours['peak_rss']:.2f} GiB, {ours['peak_anonymous']:.2f} GiB")
    print(f"ratios (ours / torch): time {ours['s_per_step'] / torch['s_per_step']:.2f}x, "
          f"peak RSS {ours['peak_rss'] / torch['peak_rss']:.2f}x, "
          f"peak anonymous {ours['peak_anonymous'] / torch['peak_anonymous']:.2f}x; logs in {work_dir}")


if __name__ == "__main__":
    main()
