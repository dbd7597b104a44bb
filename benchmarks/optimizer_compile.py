"""Compile time of the optimizer update over a full-size SDXL LoRA's tensors: one graph, or parts.

    python benchmarks/optimizer_compile.py --parts 1
    python benchmarks/optimizer_compile.py --parts 8

1444 tensors of rank-8 LoRA shapes (722 down/up pairs, widths 640/1280/2048), clipping to norm 1, then
AdamW: with --parts 1 both in one graph, as mindone's TrainStep compiles them; otherwise clipping in one
graph and the update in `split_update` parts, as the --gradient_checkpointing step runs them. Prints the
time of the first call (compile and one run).
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mindspore as ms  # noqa: E402
from mindspore import Parameter, Tensor, ops  # noqa: E402

from library.optimizers import AdamW, split_update  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tensors", type=int, default=1444)
    parser.add_argument("--parts", type=int, default=1)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    params, grads = [], []
    for pair in range(args.tensors // 2):
        width = (640, 1280, 2048)[pair % 3]
        for side, shape in (("down", (8, width)), ("up", (width, 8))):
            params.append(Parameter(Tensor(rng.standard_normal(shape).astype(np.float32)), name=f"{side}{pair}"))
            grads.append(Tensor(rng.standard_normal(shape).astype(np.float32)))
    optimizer = AdamW([{"params": params}], lr=1e-4)

    def clip(*gradients):
        return ops.clip_by_global_norm(gradients, 1.0)

    def clip_and_update(*gradients):
        return optimizer(ops.clip_by_global_norm(gradients, 1.0))

    start = time.perf_counter()
    if args.parts == 1:
        ms.jit(clip_and_update)(*grads)
    else:
        clipped = ms.jit(clip)(*grads)
        for part in split_update(optimizer, -(-len(params) // args.parts)):
            ms.jit(part.construct)(*clipped[part.first:part.last])
    print(f"tensors={len(params)} parts={args.parts} first_call={time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
