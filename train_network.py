"""NetworkTrainer: the generic LoRA training loop, with hooks a model family overrides (see
sdxl_train_network.py). Arguments, dataset TOML and output files follow kohya-ss/sd-scripts.
"""

import json
import logging
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass, replace
from itertools import islice
from typing import List, Optional

import numpy as np

import mindspore as ms
from mindspore import ops
from tqdm import tqdm

from library import train_args
from library.cache_process import cache_in_child_process, encoders_needed_after_caching
from library.diffusion import DiffusionTrainingMath, NoiseSettings
from library.distributed import (World, agree_on_seed, all_reduce_sum, barrier, check_ranks_agree, init_data_parallel,
                                 main_rank_only, on_any_rank, shard_targets)
from library.errors import UserError, exit_on_user_error
from library.lr_schedulers import create_lr_scheduler
from library.optimizers import create_optimizer_from_args
from library.train_dataset import build_dataset_group
from library.training_log import LossRecorder, TrainingLog, check_logging_args, step_scalars
from library.training_metadata import training_metadata
from networks import lora

logger = logging.getLogger("train_network")


def setup_parser():
    return train_args.setup_parser()


@dataclass
class TrainState:
    """Where a run is: enough to resume exactly (with the LoRA weights, optimizer state and data order)."""

    epoch: int = 1  # sd-scripts counts epochs from 1
    batch_in_epoch: int = 0  # batches of `epoch` already consumed
    global_step: int = 0  # optimizer steps done
    rng_state: Optional[dict] = None  # numpy generator state for noise and timesteps

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, text: str) -> "TrainState":
        return cls(**json.loads(text))


class NetworkTrainer:
    vae_scale_factor = 1.0
    last_validation_loss: Optional[float] = None  # shown on the progress bar once there is one
    world = World()  # this process's place under msrun data parallelism (library/distributed.py)

    # ---- hooks ----------------------------------------------------------------------------------

    def load_target_model(self, args, unet: bool = True, encoders: bool = True):
        """The models of --pretrained_model_name_or_path; `unet` and `encoders` (VAE and text encoders) choose
        the parts built, the others are None."""
        raise NotImplementedError

    def get_noise_settings(self, args) -> NoiseSettings:
        return NoiseSettings.from_args(args)

    def cache_text_encoder_outputs_if_needed(self, args, models, dataset_group):
        pass

    def build_loss_cell(self, args, models, train_text_encoder):
        raise NotImplementedError

    def step_inputs(self, args, batch, latents, targets):
        raise NotImplementedError

    def encode_images(self, models, images: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def sample_images(self, args, models, epoch, step):
        """Render --sample_prompts; `epoch` is None for step samples (names then carry the step, as sd-scripts)."""

    def update_metadata(self, metadata, args):
        pass

    # ---- the run --------------------------------------------------------------------------------

    def train(self, args):
        self.world = init_data_parallel()
        # under msrun every rank prints to its own log; rank 0 speaks for the run
        logging.basicConfig(level=logging.INFO if self.world.is_main else logging.WARNING, format="%(message)s")
        session_id = random.randint(0, 2**32)
        training_started_at = time.time()
        if args.seed is None:
            args.seed = agree_on_seed(self.world, random.randint(0, 2**32 - 1))
        np.random.seed(args.seed % 2**32)
        ms.set_seed(args.seed % 2**31)

        check_logging_args(args)
        dataset_group = build_dataset_group(args, sdxl=True)
        check_validation_args(args, dataset_group.validation)
        if self.world.is_distributed:
            dataset_group.shard(self.world.rank, self.world.size)
            logger.info(f"data parallel: {self.world.size} ranks, each with its own batches; a step's batch is "
                        f"{self.world.size} x the configured batch size")

        groups = [group for group in (dataset_group, dataset_group.validation) if group is not None]
        if encoders_needed_after_caching(args):
            models = self.load_target_model(args)
            for group in groups:
                self.cache_latents_if_needed(args, models, group)
                self.cache_text_encoder_outputs_if_needed(args, models, group)
        else:
            cache_in_child_process(type(self), args, self.world, groups)
            models = self.load_target_model(args, encoders=False)
        barrier(self.world)  # every rank's share of the cache files is written before anyone reads them

        train_unet = not args.network_train_text_encoder_only
        train_text_encoder = not args.network_train_unet_only
        # The LoRA's initial weights come from numpy's generator; building models draws from it as well, so it
        # is seeded again here: the same seed gives the same LoRA whichever models this process built.
        np.random.seed(args.seed % 2**32)
        network = self.network = self.create_network(args, models, train_unet, train_text_encoder)

        # the descriptions ("textencoder", "unet", "unet plus") name the logged learning rates, as sd-scripts
        optimizer_groups, self.lr_descriptions = network.prepare_optimizer_params(args.text_encoder_lr, args.unet_lr,
                                                                                  args.learning_rate)
        optimizer, optimizer_name, optimizer_args = create_optimizer_from_args(args, optimizer_groups)

        num_batches = dataset_group.num_batches_per_epoch
        steps_per_epoch = -(-num_batches // args.gradient_accumulation_steps)
        if args.max_train_epochs is not None:
            args.max_train_steps = args.max_train_epochs * steps_per_epoch
        num_epochs = -(-args.max_train_steps // steps_per_epoch)
        dataset_group.set_max_train_steps(args.max_train_steps, args.gradient_accumulation_steps)
        scheduler = create_lr_scheduler(args, optimizer, self.world.size)

        loss_cell = self.build_loss_cell(args, models, train_text_encoder)
        step_cell = self.build_train_step(args, loss_cell, optimizer)
        self.loss_cell = loss_cell
        self.forward_loss = self.build_forward_loss(args, loss_cell)

        state = TrainState(rng_state=np.random.default_rng(args.seed).bit_generator.state)
        if args.resume:
            state = self.load_state(args.resume, network, optimizer)

        metadata = training_metadata(args, dataset_group, network, session_id, training_started_at, optimizer_name,
                                     optimizer_args, num_epochs)
        self.update_metadata(metadata, args)

        self.run_loop(args, models, network, dataset_group, optimizer, scheduler, step_cell, state, num_epochs,
                      metadata)

    def cache_latents_if_needed(self, args, models, dataset_group):
        if not args.cache_latents:
            return
        from library.latent_cache import cache_latents

        cache_latents(dataset_group, lambda images: self.encode_images(models, images),
                      vae_batch_size=args.vae_batch_size, to_disk=args.cache_latents_to_disk,
                      skip_cache_check=args.skip_cache_check, rank=self.world.rank, world_size=self.world.size)

    def create_network(self, args, models, train_unet, train_text_encoder):
        kwargs = {}
        for item in args.network_args or []:
            key, _, value = item.partition("=")
            kwargs[key.strip()] = value.strip()
        if args.dim_from_weights:
            network, _ = lora.create_network_from_weights(1.0, args.network_weights, models.vae, models.text_encoders,
                                                          models.unet, **kwargs)
        else:
            # Text-encoder modules only when trained: each module draws its initial weights in turn, so the UNet's
            # must not depend on whether the text encoders were loaded (see library/cache_process.py).
            text_encoders = models.text_encoders if train_text_encoder else []
            network = lora.create_network(1.0, args.network_dim, args.network_alpha, models.vae, text_encoders,
                                          models.unet, neuron_dropout=args.network_dropout, **kwargs)
        network.apply_to(models.text_encoders, models.unet, train_text_encoder, train_unet)
        if args.network_weights:
            network.load_weights(args.network_weights)
        adapter = {id(p) for p in network.adapter_params()}
        for cell in filter(None, [models.unet, models.vae, *models.text_encoders]):
            for _, param in cell.parameters_and_names():
                param.requires_grad = id(param) in adapter
        return network

    def build_forward_loss(self, args, loss_cell):
        """(step inputs) -> loss without gradients, for validation."""
        return loss_cell if args.pynative else ms.jit(loss_cell.construct)

    def build_train_step(self, args, loss_cell, optimizer):
        from library.train_step import TrainStepForSDXLLoRA

        step = TrainStepForSDXLLoRA(loss_cell, optimizer, args.max_grad_norm, args.gradient_accumulation_steps)
        step.set_train(True)
        return step if args.pynative else ms.jit(step.construct)

    # ---- loop -----------------------------------------------------------------------------------

    def run_loop(self, args, models, network, dataset_group, optimizer, scheduler, step_cell, state, num_epochs,
                 metadata):
        math = DiffusionTrainingMath(self.get_noise_settings(args))
        rng = np.random.default_rng()
        rng.bit_generator.state = state.rng_state
        interrupted = {"flag": False}

        def on_stop_signal(*_):
            interrupted["flag"] = True

        # SIGTERM too: MindSpore answers a SIGINT that arrives while it compiles with a SIGTERM to its own process
        previous_handlers = {sig: signal.signal(sig, on_stop_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        training_log = TrainingLog.from_args(args) if self.world.is_main else None
        progress = tqdm(total=args.max_train_steps, initial=state.global_step, smoothing=0, desc="steps",
                        disable=not self.world.is_main)
        loss_recorder = LossRecorder()
        micro_step = state.batch_in_epoch % args.gradient_accumulation_steps
        if state.global_step == 0 and args.sample_at_first:
            self.sample_images(args, models, None, 0)
        try:
            while state.global_step < args.max_train_steps and state.epoch <= num_epochs:
                for batch in dataset_group.iter_epoch(state.epoch, start_batch=state.batch_in_epoch):
                    if micro_step == 0:
                        scheduler.apply(state.global_step)
                    latents = batch.latents if batch.latents is not None else self.encode_images(models, batch.images)
                    targets = shard_targets(math, latents * self.vae_scale_factor, batch.loss_weights, rng,
                                            batch.peer_latent_sizes, self.world.rank,
                                            lambda values: all_reduce_sum(self.world, values))
                    start = time.perf_counter()
                    loss, _ = step_cell(*self.step_inputs(args, batch, latents, targets))
                    loss = float(loss.asnumpy())
                    loss_recorder.add(state.batch_in_epoch, loss)
                    state.batch_in_epoch += 1
                    micro_step = (micro_step + 1) % args.gradient_accumulation_steps
                    if micro_step != 0:
                        continue
                    state.global_step += 1
                    state.rng_state = rng.bit_generator.state
                    if args.scale_weight_norms:
                        network.apply_max_norm_regularization(args.scale_weight_norms)
                    lrs = scheduler.logged_lrs(state.global_step)
                    shown = {} if self.last_validation_loss is None else {"val_loss": f"{self.last_validation_loss:.4f}"}
                    progress.set_postfix(loss=f"{loss:.4f}", avr_loss=f"{loss_recorder.moving_average:.4f}",
                                         lr=f"{lrs[0]:.2e}", s_per_step=f"{time.perf_counter() - start:.2f}", **shown)
                    progress.update(1)
                    if training_log:
                        values = self.step_log_values(args, optimizer, loss, loss_recorder, lrs)
                        training_log.log_step(state.global_step, values)
                    if (dataset_group.validation and args.validate_every_n_steps
                            and state.global_step % args.validate_every_n_steps == 0):
                        self.validate_and_log(args, models, dataset_group.validation, training_log, progress,
                                              loss_recorder, "step", state.global_step, state)
                    if args.save_every_n_steps and state.global_step % args.save_every_n_steps == 0:
                        self.save_checkpoint(args, network, optimizer, state, metadata, step_name=True)
                    if args.sample_every_n_steps and state.global_step % args.sample_every_n_steps == 0:
                        self.sample_images(args, models, None, state.global_step)
                    if on_any_rank(self.world, interrupted["flag"]):
                        raise KeyboardInterrupt
                    # compiling a graph installs MindSpore's own SIGINT handler (it ends the process): take it back
                    signal.signal(signal.SIGINT, on_stop_signal)
                    if state.global_step >= args.max_train_steps:
                        break
                else:
                    state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                    finished_epoch = state.epoch - 1
                    self.end_epoch(args, models, dataset_group, training_log, progress, loss_recorder, finished_epoch,
                                   state)
                    if args.save_every_n_epochs and finished_epoch % args.save_every_n_epochs == 0 and state.epoch <= num_epochs:
                        self.save_checkpoint(args, network, optimizer, state, metadata, epoch_name=finished_epoch)
                    if epoch_sample_due(args, finished_epoch):
                        self.sample_images(args, models, finished_epoch, state.global_step)
                    continue
                # the step limit ended this epoch early; sd-scripts still validates, logs and samples its end
                self.end_epoch(args, models, dataset_group, training_log, progress, loss_recorder, state.epoch, state)
                if epoch_sample_due(args, state.epoch):
                    self.sample_images(args, models, state.epoch, state.global_step)
                break
        except KeyboardInterrupt:
            progress.close()
            logger.info("interrupted: saving the LoRA and a resumable state before exiting")
            self.save_model(args, network, metadata, state, args.output_name)
            self.save_state(args, network, optimizer, state, f"{args.output_name}-state")
            barrier(self.world)  # msrun kills every worker as soon as one exits non-zero: let rank 0 finish saving
            raise SystemExit(130)
        finally:
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
            dataset_group.close()
            if training_log:
                training_log.close()
        progress.close()
        check_ranks_agree(self.world, network.adapter_params())
        path = self.save_model(args, network, metadata, state, args.output_name)
        if args.save_state or args.save_state_on_train_end:
            self.save_state(args, network, optimizer, state, f"{args.output_name}-state")
        logger.info("model saved: %s", path)

    # ---- logging --------------------------------------------------------------------------------

    def step_log_values(self, args, optimizer, loss, loss_recorder, lrs):
        is_prodigy = args.optimizer_type.lower() == "prodigy"
        prodigy_d = float(optimizer.d.asnumpy()) if is_prodigy else None
        return step_scalars(loss, loss_recorder.moving_average, lrs, self.lr_descriptions, prodigy_d)

    def end_epoch(self, args, models, dataset_group, training_log, progress, loss_recorder, epoch, state):
        every = args.validate_every_n_epochs
        if dataset_group.validation and (every is None or epoch % every == 0):
            self.validate_and_log(args, models, dataset_group.validation, training_log, progress, loss_recorder,
                                  "epoch", epoch, state)
        if training_log:
            training_log.log_epoch(epoch, state.global_step, {"loss/epoch_average": loss_recorder.moving_average})

    # ---- validation -----------------------------------------------------------------------------

    @main_rank_only
    def validate_and_log(self, args, models, validation_group, training_log, progress, loss_recorder, kind, at,
                         state):
        """sd-scripts' step or epoch validation: loss/validation/<kind>_average and _divergence (minus the
        training loss average), logged at the global step or the epoch, and shown on the progress bar.
        Rank 0's alone under data parallelism (every rank would compute the same number)."""
        loss = self.validation_loss(args, models, validation_group)
        self.last_validation_loss = loss
        progress.set_postfix(val_loss=f"{loss:.4f}")
        if training_log:
            values = {f"loss/validation/{kind}_average": loss,
                      f"loss/validation/{kind}_divergence": loss - loss_recorder.moving_average}
            if kind == "step":
                training_log.log_step(at, values)
            else:
                training_log.log_epoch(at, state.global_step, values)

    def validation_loss(self, args, models, validation_group) -> float:
        """The mean loss over the held-out batches (at most --max_validation_steps of them), each at sd-scripts'
        4 fixed timesteps, with noise drawn from --validation_seed (default --seed) afresh at every validation.
        No gradient, no update, LoRA dropout off, and the training noise generator is not used."""
        seed = args.validation_seed if args.validation_seed is not None else args.seed
        rng = np.random.default_rng(seed)
        settings = self.get_noise_settings(args)
        batches = islice(validation_group.iter_epoch(1, num_workers=0), args.max_validation_steps)
        losses = []
        self.loss_cell.set_train(False)
        try:
            for batch in batches:
                latents = batch.latents if batch.latents is not None else self.encode_images(models, batch.images)
                for timestep in validation_timesteps(args):
                    math = DiffusionTrainingMath(replace(settings, min_timestep=timestep, max_timestep=timestep))
                    targets = math.prepare(latents * self.vae_scale_factor, batch.loss_weights, rng)
                    loss = self.forward_loss(*self.step_inputs(args, batch, latents, targets))
                    losses.append(float(loss.asnumpy()))
        finally:
            self.loss_cell.set_train(True)
        return float(np.mean(losses))

    # ---- saving and resuming --------------------------------------------------------------------

    @main_rank_only
    def save_model(self, args, network, metadata, state, name) -> str:
        os.makedirs(args.output_dir, exist_ok=True)
        path = os.path.join(args.output_dir, f"{name}.safetensors")
        metadata = dict(metadata, ss_training_finished_at=time.time(), ss_steps=state.global_step,
                        ss_epoch=state.epoch if state.batch_in_epoch else state.epoch - 1)
        network.save_weights(path, _save_dtype(args.save_precision), metadata, args.no_metadata)
        return path

    @main_rank_only
    def save_checkpoint(self, args, network, optimizer, state, metadata, epoch_name=None, step_name=False):
        if step_name:
            name = f"{args.output_name}-step{state.global_step:08d}"
            keep, every, current = args.save_last_n_steps, args.save_every_n_steps, state.global_step
        else:
            name = f"{args.output_name}-{epoch_name:06d}"
            keep, every, current = args.save_last_n_epochs, args.save_every_n_epochs, epoch_name
        self.save_model(args, network, metadata, state, name)
        if args.save_state:
            self.save_state(args, network, optimizer, state, f"{name}-state")
        if keep:
            old = current - every * keep
            if old > 0:
                old_name = (f"{args.output_name}-step{old:08d}" if step_name else f"{args.output_name}-{old:06d}")
                stale = os.path.join(args.output_dir, old_name + ".safetensors")
                if os.path.exists(stale):
                    os.remove(stale)
                shutil.rmtree(os.path.join(args.output_dir, old_name + "-state"), ignore_errors=True)

    @main_rank_only
    def save_state(self, args, network, optimizer, state, folder_name):
        """LoRA weights, optimizer state and the train state, written to a temporary folder then renamed."""
        final = os.path.join(args.output_dir, folder_name)
        temporary = final + ".tmp"
        shutil.rmtree(temporary, ignore_errors=True)
        os.makedirs(temporary)
        network.save_weights(os.path.join(temporary, "lora.safetensors"), np.float32, {})
        ms.save_checkpoint(optimizer, os.path.join(temporary, "optimizer.ckpt"))
        with open(os.path.join(temporary, "train_state.json"), "w", encoding="utf-8") as handle:
            handle.write(state.to_json())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(temporary, final)
        logger.info("state saved: %s", final)

    def load_state(self, folder, network, optimizer) -> TrainState:
        files = [os.path.join(folder, name) for name in ("lora.safetensors", "optimizer.ckpt", "train_state.json")]
        missing = [path for path in files if not os.path.exists(path)]
        if missing:
            raise UserError(f"--resume {folder}: not a saved state (missing {os.path.basename(missing[0])})")
        network.load_weights(files[0])
        saved = ms.load_checkpoint(files[1])
        for name, param in optimizer.parameters_and_names():
            if param.name in saved:
                ops.assign(param, saved[param.name])
        with open(files[2], encoding="utf-8") as handle:
            state = TrainState.from_json(handle.read())
        logger.info("resuming from %s at epoch %d, step %d", folder, state.epoch, state.global_step)
        return state


def epoch_sample_due(args, epoch: int) -> bool:
    """sd-scripts samples at the end of (1-based) epoch `epoch` only when --sample_every_n_epochs divides it."""
    return bool(args.sample_every_n_epochs) and epoch % args.sample_every_n_epochs == 0


def validation_timesteps(args) -> List[int]:
    """sd-scripts' fixed validation timesteps: 4 evenly spaced inside [min_timestep, max_timestep]
    (default [0, 1000]), the ends left out: 200, 400, 600, 800 by default."""
    low = args.min_timestep or 0
    high = 1000 if args.max_timestep is None else args.max_timestep
    return [int(t) for t in np.linspace(low, high, 4 + 2, dtype=int)[1:-1]]


def check_validation_args(args, validation_group) -> None:
    """The validation arguments mean nothing without held-out images; say so instead of ignoring them."""
    if args.max_validation_steps is not None and args.max_validation_steps < 1:
        raise UserError(f"--max_validation_steps {args.max_validation_steps}: must be at least 1 (or left out: all)")
    if validation_group is not None:
        return
    for name in ("validate_every_n_steps", "validate_every_n_epochs", "max_validation_steps", "validation_seed"):
        if getattr(args, name) is not None:
            raise UserError(f"--{name} needs held-out images: set validation_split in the dataset config")


def _save_dtype(save_precision):
    import ml_dtypes

    return {"fp16": np.float16, "bf16": ml_dtypes.bfloat16, "float": np.float32, None: np.float32}[save_precision]


def main(trainer_class, argv=None):
    with exit_on_user_error():
        args = train_args.parse_args(argv)
        trainer_class().train(args)
