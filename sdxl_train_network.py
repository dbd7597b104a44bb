"""Train an SDXL LoRA, with sd-scripts' command line:

    python sdxl_train_network.py --pretrained_model_name_or_path sd_xl_base_1.0.safetensors \\
        --dataset_config dataset.toml --output_dir out --output_name my_lora --network_dim 8 ...
    python sdxl_train_network.py --config_file args.toml
"""

import logging
import os

import numpy as np

import mindspore as ms

from library.distributed import main_rank_only
from library.errors import UserError
from library.layers import HALF_PRECISION_DTYPES, store_weights_in
from library.model_loading import load_sdxl
from library.sdxl_vae import SDXL_VAE_SCALE_FACTOR, sample_latents
from library.text_encoders import SDXLTextEncoding, eos_mask
from library.tokenizers import chunk_count, load_sdxl_tokenizers, tokenize_prompts
from library.train_step import CachedConditioning, FrozenConditioning, SDXLLoRALoss
from train_network import NetworkTrainer, main

logger = logging.getLogger("sdxl_train_network")


class SdxlNetworkTrainer(NetworkTrainer):
    vae_scale_factor = SDXL_VAE_SCALE_FACTOR

    def load_target_model(self, args, unet: bool = True, encoders: bool = True):
        models = load_sdxl(args.pretrained_model_name_or_path, args.vae, unet=unet, encoders=encoders)
        if unet and args.mixed_precision in HALF_PRECISION_DTYPES:
            # As sd-scripts: the frozen UNet is held in the mixed-precision dtype; here the layers cast each
            # weight to the activations' dtype, and compute stays fp32 (CPU has no fast half kernels).
            saved = store_weights_in(models.unet, HALF_PRECISION_DTYPES[args.mixed_precision])
            logger.info(f"--mixed_precision {args.mixed_precision}: UNet weights stored in {args.mixed_precision} "
                        f"({saved / 2**30:.2f} GiB saved); computation in fp32, so each layer casts its weight "
                        f"(on CPU this costs time: 2x s/step measured at full size)")
        if encoders:  # tokens are only for the text encoders (caching, uncached captions, samples)
            self.tokenizers = load_sdxl_tokenizers(args.tokenizer_cache_dir)
            self.n_chunks = chunk_count(args.max_token_length)
            self._max_token_length = args.max_token_length
            self.text_encoding = SDXLTextEncoding(models.text_encoder1, models.text_encoder2, self.n_chunks)
            self._encode_moments = ms.jit(models.vae.encode_moments)
        self._latent_rng = np.random.default_rng(args.seed)
        self._sampler = None
        self._unet_forward = None
        return models

    def encode_images(self, models, images: np.ndarray) -> np.ndarray:
        """Unscaled VAE latents, sampled from the latent distribution as sd-scripts caches them."""
        mean, logvar = self._encode_moments(ms.Tensor(images.astype(np.float32)))
        return sample_latents(mean.asnumpy(), logvar.asnumpy(), self._latent_rng)

    def _token_inputs(self, captions):
        ids1 = tokenize_prompts(self.tokenizers[0], captions, self._max_token_length).reshape(-1, 77)
        ids2 = tokenize_prompts(self.tokenizers[1], captions, self._max_token_length).reshape(-1, 77)
        return ms.Tensor(ids1), ms.Tensor(ids2), ms.Tensor(eos_mask(ids2))

    def cache_text_encoder_outputs_if_needed(self, args, models, dataset_group):
        if not args.cache_text_encoder_outputs:
            return
        from library.latent_cache import cache_text_encoder_outputs

        encode = ms.jit(self.text_encoding.construct)
        width1 = models.text_encoder1.config.hidden_size

        def encode_fn(captions):
            context, pooled = encode(*self._token_inputs(captions))
            context = context.asnumpy()
            return context[..., :width1], context[..., width1:], pooled.asnumpy()

        cache_text_encoder_outputs(dataset_group, encode_fn, to_disk=args.cache_text_encoder_outputs_to_disk,
                                   skip_cache_check=args.skip_cache_check, rank=self.world.rank,
                                   world_size=self.world.size)

    def build_loss_cell(self, args, models, train_text_encoder):
        if args.cache_text_encoder_outputs:
            conditioning = CachedConditioning()
        elif train_text_encoder:
            conditioning = self.text_encoding
        else:
            conditioning = FrozenConditioning(self.text_encoding)
        return SDXLLoRALoss(models.unet, conditioning, args.loss_type)

    def build_forward_loss(self, args, loss_cell):
        if args.gradient_checkpointing:  # validation through the training units (built just before): no UNet graph
            return self._blockwise_loss
        return super().build_forward_loss(args, loss_cell)

    def build_train_step(self, args, loss_cell, optimizer):
        if not args.gradient_checkpointing:
            return super().build_train_step(args, loss_cell, optimizer)
        if args.pynative:
            raise UserError("--pynative and --gradient_checkpointing do not combine: checkpointing compiles the "
                            "UNet block by block; drop one of them")
        from library.blockwise import BlockwiseTrainStepForSDXLLoRA

        step = BlockwiseTrainStepForSDXLLoRA(loss_cell, optimizer, args.max_grad_norm,
                                             args.gradient_accumulation_steps)
        self._unet_forward, self._blockwise_loss = step.blockwise.predict, step.blockwise.loss
        blockwise = step.blockwise
        logger.info(f"--gradient_checkpointing: the UNet runs as {blockwise.num_units} units sharing "
                    f"{blockwise.num_compiled_units} compiled structures; transformer blocks keep their activations "
                    f"(up to {blockwise.max_saved_bytes / 2**30:.0f} GiB a step), other units recompute theirs")
        return step.run

    def step_inputs(self, args, batch, latents, targets):
        sizes = np.concatenate([batch.original_sizes_hw, batch.crop_top_lefts, batch.target_sizes_hw], axis=1)
        if batch.text_encoder_outputs is not None:
            hidden1, hidden2, pool2 = batch.text_encoder_outputs
            text = (ms.Tensor(np.concatenate([hidden1, hidden2], axis=-1).astype(np.float32)),
                    ms.Tensor(pool2.astype(np.float32)), ms.Tensor(np.zeros((), np.float32)))
        else:
            text = self._token_inputs(batch.captions)
        return (ms.Tensor(targets.noisy_latents), ms.Tensor(targets.target), ms.Tensor(targets.timesteps),
                ms.Tensor(sizes.astype(np.float32)), ms.Tensor(targets.loss_weights), ms.Tensor(targets.huber_c),
                *text)

    @main_rank_only
    def sample_images(self, args, models, epoch, step):
        if not args.sample_prompts:
            return
        from library.sample_prompts import load_sample_prompts
        from library.sampling import SDXLSampler, sample_image_name, save_sample_image

        if self._sampler is None:
            self._sampler = SDXLSampler(models, self.tokenizers, args.max_token_length, args.v_parameterization,
                                        args.sample_sampler, self._unet_forward)
        output_dir = os.path.join(args.output_dir, "sample")
        os.makedirs(output_dir, exist_ok=True)
        for index, prompt in enumerate(load_sample_prompts(args.sample_prompts)):
            sample = self._sampler.render(prompt)
            name = sample_image_name(args.output_name, epoch, step, index, prompt.seed)
            save_sample_image(sample.image, output_dir, name, sample.params)


if __name__ == "__main__":
    main(SdxlNetworkTrainer)
