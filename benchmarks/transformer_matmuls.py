"""The matrix products of a full-size SDXL LoRA step's transformer blocks, timed alone: ours (MindSpore, in the
forms the step uses) and, with --torch_python, torch's on the same machine, interleaved.

    python benchmarks/transformer_matmuls.py --resolution 256 --torch_python ../torch-venv/bin/python

Why: at 256 px the transformer blocks are ~2/3 of our step and their time is mostly these products, so the
ratio printed last is the floor our step can reach against torch's with the framework's CPU MatMul kernel as
it is, whatever else gets faster. Counted per step: every projection of the 70 blocks and the transformers'
proj_in/proj_out forward, and the backward's input gradient of each of them (dy @ W) except the
cross-attention keys and values, whose input is the text conditioning. The rank-8 LoRA products and the
attention products themselves are left out (small at these sizes).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from typing import Callable, Dict, List, Tuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mindspore as ms  # noqa: E402

from library import backend  # noqa: E402
from library.model_configs import sdxl_base_configs  # noqa: E402
from library.sdxl_unet import UNetConfig  # noqa: E402

Product = Tuple[int, int, int, str]  # (rows M, inner K, outputs N, "forward" x W^T or "input_grad" dy W)
CONTEXT_TOKENS = 77
WEIGHTS_PER_SHAPE = 4  # distinct weights in rotation, so that no product runs from a warm cache


def transformer_products(config: UNetConfig, resolution: int) -> Counter:
    """{(M, K, N, direction): count per step} over every SpatialTransformer of the UNet."""
    products = Counter()
    levels = len(config.channel_mult)
    for level, mult in enumerate(config.channel_mult):
        channels, tokens = mult * config.model_channels, (resolution // 8 // 2**level) ** 2
        middle_depth = config.transformer_depth_middle if level == levels - 1 else 0
        # (transformers, blocks in each): one per down block and per up block (one more of those); the middle's
        for transformers, blocks_each in ((2 * config.num_res_blocks + 1, config.transformer_depth[level]),
                                          (1, middle_depth)):
            if not blocks_each:
                continue
            blocks = transformers * blocks_each
            square = 6 * blocks + 2 * transformers  # q, k, v, out of both attentions but cross k/v; proj in/out
            for direction in ("forward", "input_grad"):
                products[(tokens, channels, channels, direction)] += square
                products[(tokens, channels, 8 * channels, direction)] += blocks  # GEGLU input projection
                products[(tokens, 4 * channels, channels, direction)] += blocks  # feed-forward output
            products[(CONTEXT_TOKENS, config.context_dim, channels, "forward")] += 2 * blocks
    return products


def our_timer(shapes: List[Product]) -> Callable[[], Dict[Product, float]]:
    """-> a function timing one round of the products, compiled as the step compiles them (seconds each)."""
    compiled = {"forward": ms.jit(backend.linear), "input_grad": ms.jit(backend.linear_input_grad)}
    rng = np.random.default_rng(0)
    operands = {}
    for rows, inner, outputs, direction in shapes:
        left = (rows, inner) if direction == "forward" else (rows, outputs)
        operands[(rows, inner, outputs, direction)] = (
            ms.Tensor(rng.standard_normal(left, dtype=np.float32)),
            [ms.Tensor(rng.standard_normal((outputs, inner), dtype=np.float32)) for _ in range(WEIGHTS_PER_SHAPE)])

    def one_round():
        times = {}
        for shape in shapes:
            left, weights = operands[shape]
            function = compiled[shape[3]]
            start = time.perf_counter()
            for weight in weights:
                result = function(left, weight)
            result.asnumpy()
            times[shape] = (time.perf_counter() - start) / len(weights)
        return times

    one_round()  # compiles and warms up
    return one_round


# Runs under the torch interpreter: the same products as torch's CPU linear layer computes them.
_TORCH_SCRIPT = """
import json, sys, time
import torch
shapes, rounds, per_shape = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
operands = []
for rows, inner, outputs, direction in shapes:
    left = torch.randn(rows, inner) if direction == "forward" else torch.randn(rows, outputs)
    operands.append((left, [torch.randn(outputs, inner) for _ in range(per_shape)]))
times = [[] for _ in shapes]
with torch.no_grad():
    for _ in range(rounds + 1):
        for index, (shape, (left, weights)) in enumerate(zip(shapes, operands)):
            start = time.perf_counter()
            for weight in weights:
                result = torch.nn.functional.linear(left, weight) if shape[3] == "forward" else left @ weight
            times[index].append((time.perf_counter() - start) / len(weights))
print(json.dumps([sorted(values[1:])[len(values[1:]) // 2] for values in times]))
"""


def time_torch(torch_python: str, shapes: List[Product], rounds: int) -> Dict[Product, float]:
    # MindSpore sets OMP_NUM_THREADS=1 in the C environment, which a child inherits by default; torch would
    # then run on one thread. os.environ is the environment as Python saw it (the user's own setting stays).
    finished = subprocess.run([torch_python, "-c", _TORCH_SCRIPT, json.dumps(shapes), str(rounds),
                               str(WEIGHTS_PER_SHAPE)], capture_output=True, text=True, check=True,
                              env=dict(os.environ))
    return dict(zip(shapes, json.loads(finished.stdout.strip().splitlines()[-1])))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds; ours and torch's alternate")
    parser.add_argument("--torch_python", default=None, help="a Python with torch, to time the same products")
    args = parser.parse_args(argv)

    ms.set_context(mode=ms.GRAPH_MODE)
    products = transformer_products(sdxl_base_configs()[0], args.resolution)
    shapes = sorted(products)
    ours, torch_times = {shape: [] for shape in shapes}, {shape: [] for shape in shapes}
    our_round = our_timer(shapes)
    for _ in range(args.rounds):  # alternate the frameworks: these machines drift within minutes
        for shape, seconds in our_round().items():
            ours[shape].append(seconds)
        if args.torch_python:
            for shape, seconds in time_torch(args.torch_python, shapes, 1).items():
                torch_times[shape].append(seconds)

    print(f"transformer-block products of a full-size SDXL LoRA step at {args.resolution} px, ms each "
          f"(median of {args.rounds} rounds)")
    total_ours = total_torch = flops = 0.0
    for shape in shapes:
        rows, inner, outputs, direction = shape
        count, seconds = products[shape], float(np.median(ours[shape]))
        total_ours += count * seconds
        flops += count * 2.0 * rows * inner * outputs
        line = (f"  {direction:10s} {rows:5d} x {inner:5d} x {outputs:5d}  {count:4d} a step  "
                f"ours {seconds * 1e3:7.2f} ({2.0 * rows * inner * outputs / seconds / 1e9:4.0f} GFLOP/s)")
        if args.torch_python:
            torch_seconds = float(np.median(torch_times[shape]))
            total_torch += count * torch_seconds
            line += f"  torch {torch_seconds * 1e3:7.2f}  ratio {seconds / torch_seconds:.2f}"
        print(line)
    summary = f"per step: {flops / 1e9:.0f} GFLOP, ours {total_ours:.2f} s"
    if args.torch_python:
        summary += f", torch {total_torch:.2f} s, ratio {total_ours / total_torch:.2f}"
    print(summary)


if __name__ == "__main__":
    main()
