"""Time N SDXL LoRA training steps through the project's real model, LoRA and train-step code.

    python benchmarks/sdxl_lora_step.py --size full --resolution 256 --steps 6
    python benchmarks/sdxl_lora_step.py --size tiny --resolution 64 --steps 10 --pynative
    python benchmarks/sdxl_lora_step.py --size full --resolution 256 --steps 4 --gradient_checkpointing

Random weights (full: SDXL base configs from configs/sdxl_base), rank-8 UNet-only LoRA on sd-scripts'
targets, cached-conditioning inputs of the right shapes, batch 1, fp32, AdamW. Prints compile time
(first step), median s/step over steps 2..N, peak RSS and achieved GFLOP/s (a LoRA step is counted as
twice the UNet forward: the forward, and the backward to the activations; weight gradients exist only
for the small LoRA matrices).

`--gradient_checkpointing` measures the trainer's step under that flag (library/blockwise.py): the UNet
compiled unit by unit, units of the same structure sharing a graph, transformer blocks keeping their
activations for a hand-written backward and the other units recomputing their forward in the backward pass
(README, "Full-size step").
"""

import argparse
import csv
import glob
import os
import resource
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mindspore as ms  # noqa: E402

from library.blockwise import BlockwiseTrainStepForSDXLLoRA  # noqa: E402
from library.diffusion import DiffusionTrainingMath, NoiseSettings  # noqa: E402
from library.layers import HALF_PRECISION_DTYPES, freeze, store_weights_in, weight_init  # noqa: E402
from library.model_configs import sdxl_base_configs  # noqa: E402
from library.optimizers import create_optimizer  # noqa: E402
from library.sdxl_unet import SDXLUNet, UNetConfig  # noqa: E402
from library.text_encoders import build_text_encoder  # noqa: E402
from library.train_step import CachedConditioning, SDXLLoRALoss, TrainStepForSDXLLoRA  # noqa: E402
from networks import lora  # noqa: E402
from tools.make_tiny_sdxl import TINY_UNET  # noqa: E402

MID_UNET = UNetConfig(model_channels=160, transformer_depth=(0, 1, 4), transformer_depth_middle=4, context_dim=1024,
                      adm_in_channels=640 + 1536)


def unet_forward_flops(config: UNetConfig, height: int, width: int, context_tokens: int = 77) -> float:
    """Multiply-adds x 2 of every convolution, linear layer and attention product of one forward pass."""
    flops = 0.0
    emb = config.time_embed_dim
    flops += 2 * (config.model_channels * emb + emb * emb + config.adm_in_channels * emb + emb * emb)

    def conv(cin, cout, pixels, k=3):
        return 2.0 * pixels * cin * cout * k * k

    def resblock(cin, cout, pixels):
        return conv(cin, cout, pixels) + conv(cout, cout, pixels) + 2.0 * emb * cout + (
            conv(cin, cout, pixels, 1) if cin != cout else 0.0)

    def transformer(ch, depth, tokens):
        per_block = 2.0 * tokens * ch * ch * 4  # attn1 q, k, v, out
        per_block += 2.0 * tokens * ch * ch * 2 + 2.0 * context_tokens * config.context_dim * ch * 2  # attn2
        per_block += 2.0 * 2 * tokens * tokens * ch + 2.0 * 2 * tokens * context_tokens * ch  # attention products
        per_block += 2.0 * tokens * ch * ch * 8 + 2.0 * tokens * ch * 4 * ch  # GEGLU ff
        return depth * per_block + 2 * 2.0 * tokens * ch * ch  # proj_in, proj_out

    h, w = height, width
    ch = config.model_channels
    flops += conv(config.in_channels, ch, h * w)
    skips = [ch]
    levels = len(config.channel_mult)
    for level, mult in enumerate(config.channel_mult):
        for _ in range(config.num_res_blocks):
            out = mult * config.model_channels
            flops += resblock(ch, out, h * w)
            ch = out
            if config.transformer_depth[level]:
                flops += transformer(ch, config.transformer_depth[level], h * w)
            skips.append(ch)
        if level != levels - 1:
            h, w = h // 2, w // 2
            flops += conv(ch, ch, h * w)
            skips.append(ch)
    flops += 2 * resblock(ch, ch, h * w) + transformer(ch, config.transformer_depth_middle, h * w)
    for level, mult in reversed(list(enumerate(config.channel_mult))):
        for index in range(config.num_res_blocks + 1):
            out = mult * config.model_channels
            flops += resblock(ch + skips.pop(), out, h * w)
            ch = out
            if config.transformer_depth[level]:
                flops += transformer(ch, config.transformer_depth[level], h * w)
            if level and index == config.num_res_blocks:
                h, w = h * 2, w * 2
                flops += conv(ch, ch, h * w)
    return flops + conv(ch, config.out_channels, h * w)


def time_units(units):
    """Wrap each unit's forward and backward (and those of its saving variant) with a timer, waiting for the
    result; -> {(kind, pass, input shape): [s]}."""
    times = {}

    def timed(function, kind, direction, first_output, input_shape):
        def call(*args, **kwargs):
            start = time.perf_counter()
            result = function(*args, **kwargs)
            first_output(result).asnumpy()
            times.setdefault((kind, direction, input_shape(*args, **kwargs)), []).append(time.perf_counter() - start)
            return result
        return call

    def backward_input_shape(upstream, tensors):
        return tuple(tensors[0].shape)

    for unit in units:
        unit.forward = timed(unit.forward, unit.kind, "forward", lambda result: result,
                             lambda *tensors: tuple(tensors[0].shape))
        unit.backward = timed(unit.backward, unit.kind, "backward", lambda result: result[0][0], backward_input_shape)
        if unit.saving is not None:
            saving = unit.saving
            saving.forward = timed(saving.forward, unit.kind, "forward, saving", lambda result: result[0],
                                   lambda tensors: tuple(tensors[0].shape))
            saving.backward = timed(saving.backward, unit.kind, "backward, saved", lambda result: result[0][0],
                                    lambda upstream, tensors, saved: tuple(tensors[0].shape))
    return times


def print_unit_times(times, steps):
    """Seconds per step in each (kind, pass, input shape), over steps 2..N (step 1 compiles)."""
    rows = []
    for (kind, direction, shape), values in times.items():
        calls_per_step = len(values) // steps
        rows.append((sum(values[calls_per_step:]) / max(steps - 1, 1), kind, direction, shape, calls_per_step))
    print(f"units: {sum(row[0] for row in rows):.2f} s/step in compiled units (steps 2..{steps})")
    for per_step, kind, direction, shape, calls in sorted(rows, reverse=True):
        print(f"  {kind:18s} {direction:16s} {str(shape):22s} {calls:3d} calls {per_step:6.2f} s/step")


def print_op_times(profile_dir, steps, mean_step_seconds):
    """Kernel time per op type per step over steps 2..N, from MindSpore's profiler output in `profile_dir`."""
    rows = []
    for path in glob.glob(os.path.join(profile_dir, "**", "cpu_op_type_info_*.csv"), recursive=True):
        with open(path) as file:
            rows.extend(csv.DictReader(file))
    per_op = {}
    for row in rows:  # each op type appears once per file
        count, ms = per_op.get(row["op_type"], (0, 0.0))
        per_op[row["op_type"]] = (count + int(row["type_occurrences"]), ms + float(row["total_compute_time"]))
    profiled_steps = max(steps - 1, 1)
    kernel_seconds = sum(ms for _, ms in per_op.values()) / 1000 / profiled_steps
    kernels = sum(count for count, _ in per_op.values()) // profiled_steps
    print(f"kernels: {kernels} a step, {kernel_seconds:.2f} s/step inside them "
          f"({100 * kernel_seconds / mean_step_seconds:.0f}% of the mean step)")
    for op_type, (count, ms) in sorted(per_op.items(), key=lambda item: -item[1][1])[:15]:
        print(f"  {op_type:20s} {count // profiled_steps:6d} a step {ms / 1000 / profiled_steps:6.2f} s/step "
              f"{ms / count:7.3f} ms each")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "mid", "full"), default="tiny")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--pynative", action="store_true")
    parser.add_argument("--base_dtype", choices=("fp32", "fp16", "bf16"), default="fp32",
                        help="storage of the frozen UNet weights (--mixed_precision); compute stays fp32")
    parser.add_argument("--gradient_checkpointing", action="store_true",
                        help="the trainer's unit-by-unit step instead of the whole step as one graph")
    parser.add_argument("--with_text_encoders", action="store_true",
                        help="also build both full-size text encoders and keep them resident (as the trainer does)")
    parser.add_argument("--profile_units", action="store_true",
                        help="with --gradient_checkpointing: seconds per step in each kind of unit, "
                             "forward and backward")
    parser.add_argument("--profile_ops", action="store_true",
                        help="kernel time per op type over steps 2..N (MindSpore's profiler), and the share of "
                             "the step spent inside kernels")
    args = parser.parse_args(argv)

    full_unet, _, te1, te2 = sdxl_base_configs()
    config = {"tiny": TINY_UNET, "mid": MID_UNET, "full": full_unet}[args.size]
    start = time.perf_counter()
    with weight_init(seed=0):
        unet = SDXLUNet(config)
        resident = [build_text_encoder(te1, False), build_text_encoder(te2, True)] if args.with_text_encoders else []
    build_seconds = time.perf_counter() - start
    network = lora.create_network(1.0, args.rank, args.rank / 2, None, [], unet)
    network.apply_to([], unet, apply_text_encoder=False, apply_unet=True)
    freeze(unet)
    if args.base_dtype != "fp32":
        store_weights_in(unet, HALF_PRECISION_DTYPES[args.base_dtype])
    groups, _ = network.prepare_optimizer_params(None, None, 1e-4)
    optimizer, _, _ = create_optimizer("AdamW", groups, 1e-4)
    loss_cell = SDXLLoRALoss(unet, CachedConditioning())
    unit_times = None
    if args.gradient_checkpointing:
        step = BlockwiseTrainStepForSDXLLoRA(loss_cell, optimizer, 1.0)
        run = step.run
        if args.profile_units:
            unit_times = time_units(step.blockwise.compiled_units)
    else:
        step = TrainStepForSDXLLoRA(loss_cell, optimizer, 1.0)
        run = step if args.pynative else ms.jit(step.construct)

    side = args.resolution // 8
    rng = np.random.default_rng(0)
    math = DiffusionTrainingMath(NoiseSettings())
    context = ms.Tensor(rng.standard_normal((1, 77, config.context_dim)).astype(np.float32))
    pooled = ms.Tensor(rng.standard_normal((1, config.pooled_dim)).astype(np.float32))
    sizes = ms.Tensor(np.array([[args.resolution] * 2 + [0, 0] + [args.resolution] * 2], np.float32))
    times, losses = [], []
    profiler = profile_dir = None
    for _ in range(args.steps):
        if args.profile_ops and len(times) == 1:
            from mindspore.profiler import Profiler

            profile_dir = tempfile.mkdtemp(prefix="sdxl_lora_step_profile_")
            profiler = Profiler(output_path=profile_dir)
        targets = math.prepare(rng.standard_normal((1, 4, side, side)).astype(np.float32), np.ones(1), rng)
        inputs = (ms.Tensor(targets.noisy_latents), ms.Tensor(targets.target), ms.Tensor(targets.timesteps), sizes,
                  ms.Tensor(targets.loss_weights), ms.Tensor(targets.huber_c), context, pooled,
                  ms.Tensor(np.zeros((), np.float32)))
        start = time.perf_counter()
        losses.append(float(run(*inputs)[0].asnumpy()))
        times.append(time.perf_counter() - start)
        print(f"step {len(times)}: {times[-1]:.2f} s, loss {losses[-1]:.4f}", flush=True)
    steady = float(np.median(times[1:])) if len(times) > 1 else float("nan")
    if profiler is not None:
        profiler.stop()
        profiler.analyse()
        print_op_times(profile_dir, args.steps, float(np.mean(times[1:])))
        print(f"profiler output (per-kernel timestamps and shapes) kept in {profile_dir}")
    flops = 2 * unet_forward_flops(config, side, side)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    mode = "pynative" if args.pynative else "graph-per-unit" if args.gradient_checkpointing else "graph"
    if unit_times is not None:
        print_unit_times(unit_times, args.steps)
    print(f"size={args.size} resolution={args.resolution} mode={mode} base={args.base_dtype} "
          f"text_encoders={'resident' if resident else 'none'} "
          f"build={build_seconds:.1f}s first_step={times[0]:.1f}s median_step={steady:.2f}s "
          f"peak_rss={peak:.2f}GiB step_gflop={flops / 1e9:.1f} achieved_gflops={flops / 1e9 / steady:.1f}")


if __name__ == "__main__":
    main()
