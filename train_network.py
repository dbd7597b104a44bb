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
from dataclasses import dataclass
from typing import Optional

import numpy as np

import mindspore as ms
from mindspore import ops
from tqdm import tqdm

from library import train_args
from library.diffusion import DiffusionTrainingMath, NoiseSettings
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

    # ---- hooks ----------------------------------------------------------------------------------

    def load_target_model(self, args):
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
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        session_id = random.randint(0, 2**32)
        training_started_at = time.time()
        if args.seed is None:
            args.seed = random.randint(0, 2**32 - 1)
        np.random.seed(args.seed % 2**32)
        ms.set_seed(args.seed % 2**31)

        check_logging_args(args)
        dataset_group = build_dataset_group(args, sdxl=True)

        models = self.load_target_model(args)
        self.cache_latents_if_needed(args, models, dataset_group)
        self.cache_text_encoder_outputs_if_needed(args, models, dataset_group)

        train_unet = not args.network_train_text_encoder_only
        train_text_encoder = not args.network_train_unet_only
        network = self.create_network(args, models, train_unet, train_text_encoder)

        optimizer_groups, self.lr_descriptions = network.prepare_optimizer_params(args.text_encoder_lr, args.unet_lr, args.learning_rate)
        optimizer, optimizer_name, optimizer_args = create_optimizer_from_args(args, optimizer_groups)

        num_batches = dataset_group.num_batches_per_epoch
        steps_per_epoch = -(-num_batches // args.gradient_accumulation_steps)
        if args.max_train_epochs is not None:
            args.max_train_steps = args.max_train_epochs * steps_per_epoch
        num_epochs = -(-args.max_train_steps // steps_per_epoch)
        dataset_group.set_max_train_steps(args.max_train_steps, args.gradient_accumulation_steps)
        scheduler = create_lr_scheduler(args, optimizer)

        loss_cell = self.build_loss_cell(args, models, train_text_encoder)
        step_cell = self.build_train_step(args, loss_cell, optimizer)

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
                      skip_cache_check=args.skip_cache_check)

    def create_network(self, args, models, train_unet, train_text_encoder):
        kwargs = {}
        for item in args.network_args or []:
            key, _, value = item.partition("=")
            kwargs[key.strip()] = value.strip()
        if args.dim_from_weights:
            network, _ = lora.create_network_from_weights(1.0, args.network_weights, models.vae, models.text_encoders,
                                                          models.unet, **kwargs)
        else:
            network = lora.create_network(1.0, args.network_dim, args.network_alpha, models.vae, models.text_encoders,
                                          models.unet, neuron_dropout=args.network_dropout, **kwargs)
        network.apply_to(models.text_encoders, models.unet, train_text_encoder, train_unet)
        if args.network_weights:
            network.load_weights(args.network_weights)
        adapter = {id(p) for p in network.adapter_params()}
        for cell in [models.unet, models.vae, *models.text_encoders]:
            for _, param in cell.parameters_and_names():
                param.requires_grad = id(param) in adapter
        return network

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
        previous_handler = signal.signal(signal.SIGINT, lambda *_: interrupted.update(flag=True))
        training_log = TrainingLog.from_args(args)
        progress = tqdm(total=args.max_train_steps, initial=state.global_step, smoothing=0, desc="steps")
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
                    targets = math.prepare(latents * self.vae_scale_factor, batch.loss_weights, rng)
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
                    progress.set_postfix(loss=f"{loss:.4f}", avr_loss=f"{loss_recorder.moving_average:.4f}",
                                         lr=f"{lrs[0]:.2e}", s_per_step=f"{time.perf_counter() - start:.2f}")
                    progress.update(1)
                    if training_log:
                        values = self.step_log_values(args, optimizer, loss, loss_recorder, lrs)
                        training_log.log_step(state.global_step, values)
                    if args.save_every_n_steps and state.global_step % args.save_every_n_steps == 0:
                        self.save_checkpoint(args, network, optimizer, state, metadata, step_name=True)
                    if args.sample_every_n_steps and state.global_step % args.sample_every_n_steps == 0:
                        self.sample_images(args, models, None, state.global_step)
                    if interrupted["flag"]:
                        raise KeyboardInterrupt
                    if state.global_step >= args.max_train_steps:
                        break
                else:
                    state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                    finished_epoch = state.epoch - 1
                    self.log_epoch_end(training_log, finished_epoch, state, loss_recorder)
                    if args.save_every_n_epochs and finished_epoch % args.save_every_n_epochs == 0 and state.epoch <= num_epochs:
                        self.save_checkpoint(args, network, optimizer, state, metadata, epoch_name=finished_epoch)
                    if args.sample_every_n_epochs and finished_epoch % args.sample_every_n_epochs == 0:
                        self.sample_images(args, models, finished_epoch, state.global_step)
                    continue
                # the step limit ended this epoch early; sd-scripts still logs its end
                self.log_epoch_end(training_log, state.epoch, state, loss_recorder)
                break
        except KeyboardInterrupt:
            progress.close()
            logger.info("interrupted: saving the LoRA and a resumable state before exiting")
            self.save_model(args, network, metadata, state, args.output_name)
            self.save_state(args, network, optimizer, state, f"{args.output_name}-state")
            raise SystemExit(130)
        finally:
            signal.signal(signal.SIGINT, previous_handler)
            dataset_group.close()
            if training_log:
                training_log.close()
        progress.close()
        path = self.save_model(args, network, metadata, state, args.output_name)
        if args.save_state or args.save_state_on_train_end:
            self.save_state(args, network, optimizer, state, f"{args.output_name}-state")
        self.sample_images(args, models, state.epoch, state.global_step)
        logger.info("model saved: %s", path)

    # ---- logging --------------------------------------------------------------------------------

    def step_log_values(self, args, optimizer, loss, loss_recorder, lrs):
        is_prodigy = args.optimizer_type.lower() == "prodigy"
        prodigy_d = float(optimizer.d.asnumpy()) if is_prodigy else None
        return step_scalars(loss, loss_recorder.moving_average, lrs, self.lr_descriptions, prodigy_d)

    def log_epoch_end(self, training_log, epoch, state, loss_recorder):
        if training_log:
            training_log.log_epoch(epoch, state.global_step, {"loss/epoch_average": loss_recorder.moving_average})

    # ---- saving and resuming --------------------------------------------------------------------

    def save_model(self, args, network, metadata, state, name) -> str:
        os.makedirs(args.output_dir, exist_ok=True)
        path = os.path.join(args.output_dir, f"{name}.safetensors")
        metadata = dict(metadata, ss_training_finished_at=time.time(), ss_steps=state.global_step,
                        ss_epoch=state.epoch if state.batch_in_epoch else state.epoch - 1)
        network.save_weights(path, _save_dtype(args.save_precision), metadata, args.no_metadata)
        return path

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


def _save_dtype(save_precision):
    import ml_dtypes

    return {"fp16": np.float16, "bf16": ml_dtypes.bfloat16, "float": np.float32, None: np.float32}[save_precision]


def main(trainer_class, argv=None):
    with exit_on_user_error():
        args = train_args.parse_args(argv)
        trainer_class().train(args)
