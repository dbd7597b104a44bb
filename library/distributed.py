"""Data-parallel training through MindSpore's own launcher, `msrun`.

    msrun --worker_num=2 --local_worker_num=2 --master_port=8118 --join=True --log_dir=msrun_logs \\
        sdxl_train_network.py --dataset_config dataset.toml ...

Every rank holds the whole model and LoRA, trains on its share of each step's batches, and the LoRA
gradients are averaged across ranks (mindone's TrainStep builds the all-reduce itself once the parallel
mode is DATA_PARALLEL). A step of W ranks with batch B is the step of one process with batch W*B: the
noise and timesteps are drawn for the whole global batch on every rank from the same generator, and each
rank keeps its rows (`shard_targets`). Rank 0 alone saves, logs, samples and validates.
"""

import functools
import logging
import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import numpy as np

import mindspore as ms
from mindspore import ops

from library.diffusion import DiffusionTrainingMath, TrainingTargets
from library.errors import UserError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.size > 1


def main_rank_only(method):
    """For a trainer method that saves, samples, validates or logs: every rank holds the same LoRA, so
    rank 0 alone does it and the other ranks return None at once."""
    @functools.wraps(method)
    def on_rank_0(trainer, *args, **kwargs):
        if trainer.world.is_main:
            return method(trainer, *args, **kwargs)
        return None
    return on_rank_0


def launched_by_msrun() -> bool:
    """msrun starts the script once per worker and once more as the scheduler, naming each one's role."""
    return os.environ.get("MS_ROLE") in ("MS_WORKER", "MS_SCHED")


def init_data_parallel() -> World:
    """Join the launcher's process group and make gradient reduction data-parallel (a mean over ranks);
    a plain `python` run is a world of one and changes nothing. Call before any train step is built."""
    if not launched_by_msrun():
        return World()
    from mindspore.communication import get_group_size, get_rank, init

    init()
    if os.environ["MS_ROLE"] == "MS_SCHED":  # the scheduler only connects the workers; it has no share of the work
        raise SystemExit(0)
    world = World(get_rank(), get_group_size())
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True,
                                 device_num=world.size)
    return world


def all_reduce_sum(world: World, values: np.ndarray) -> np.ndarray:
    """The sum over ranks of a float32 array (MindSpore 2.10's CPU AllReduce takes float32 and float16 only)."""
    if not world.is_distributed:
        return values
    return ops.AllReduce()(ms.Tensor(values)).asnumpy()


def barrier(world: World) -> None:
    """Wait for every rank. An all-reduce, because the Barrier op has no CPU kernel in MindSpore 2.10."""
    all_reduce_sum(world, np.zeros(1, np.float32))


def agree_on_seed(world: World, seed: int) -> int:
    """Rank 0's seed on every rank (a run without --seed draws one per process)."""
    halves = np.array([seed >> 16, seed & 0xFFFF] if world.is_main else [0, 0], np.float32)  # exact in float32
    high, low = all_reduce_sum(world, halves)
    return (int(high) << 16) + int(low)


def on_any_rank(world: World, flag: bool) -> bool:
    """Whether `flag` is set on at least one rank; every rank gets the same answer, so that a Ctrl-C that
    reaches the ranks at slightly different moments still stops them all after the same step."""
    if not world.is_distributed:
        return flag
    return bool(all_reduce_sum(world, np.array([float(flag)], np.float32))[0] > 0)


def check_ranks_agree(world: World, params: Sequence[ms.Parameter]) -> None:
    """Data parallelism keeps every rank's LoRA identical; a difference means a broken setup (e.g. ranks
    launched with different arguments), so say so instead of saving one rank's weights silently."""
    if not world.is_distributed:
        return
    fingerprint = np.array([sum(float(np.square(p.asnumpy(), dtype=np.float64).sum()) for p in params)], np.float32)
    total = all_reduce_sum(world, fingerprint)
    if not np.allclose(total, fingerprint * world.size, rtol=1e-5):
        raise UserError("the ranks' LoRA weights differ, so nothing was saved: launch every rank with the same "
                        "arguments")


def shard_targets(math: DiffusionTrainingMath, latents: np.ndarray, sample_weights: np.ndarray,
                  rng: np.random.Generator, peer_latent_sizes: Optional[Sequence[Tuple[int, int, int]]], rank: int,
                  sum_over_ranks: Callable[[np.ndarray], np.ndarray]) -> TrainingTargets:
    """This rank's rows of the targets of the step's global batch.

    `peer_latent_sizes` are every rank's (batch, latent height, latent width), in rank order (None: a
    single process).
    Every rank draws the same values in the same order. When all ranks' batches share a shape the draw is
    the one-process draw for the stacked batch, so training equals one process with the W-times batch;
    otherwise each rank's batch is drawn in turn. Other ranks' latents are stand-in zeros, since almost
    every quantity `prepare` computes is per row; only when the rows are coupled (see
    `DiffusionTrainingMath.rows_are_coupled`) are the real ones gathered with `sum_over_ranks`."""
    if peer_latent_sizes is None:
        return math.prepare(latents, sample_weights, rng)
    peer_shapes = [(rows, latents.shape[1], height, width) for rows, height, width in peer_latent_sizes]
    if len(set(peer_shapes)) == 1:
        rows = slice(rank * latents.shape[0], (rank + 1) * latents.shape[0])
        stacked = np.zeros((latents.shape[0] * len(peer_shapes), *latents.shape[1:]), np.float32)
        stacked[rows] = latents
        if math.rows_are_coupled:
            stacked = sum_over_ranks(stacked)
        weights = np.ones(len(stacked), np.float32)
        weights[rows] = sample_weights
        targets = math.prepare(stacked, weights, rng)
        return TrainingTargets(*(array[rows] for array in (
            targets.noisy_latents, targets.target, targets.timesteps, targets.loss_weights, targets.huber_c)))
    mine = None
    for peer, shape in enumerate(peer_shapes):
        if peer == rank:
            mine = math.prepare(latents, sample_weights, rng)
        else:
            math.prepare(np.zeros(shape, np.float32), np.ones(shape[0], np.float32), rng)
    return mine
