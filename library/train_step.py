"""The SDXL LoRA training step: model forward and loss inside, gradients of the LoRA parameters,
clipping, accumulation and the optimizer update through mindone's `TrainStep`.

Inputs and outputs are tuples of tensors (graph mode rejects dicts). Everything stochastic (noise,
timesteps) and every per-sample loss factor is computed on the host by `library.diffusion`, so the
compiled graph is only: conditioning -> UNet -> loss.

Step inputs, in order:
    noisy_latents f32 [B,4,h,w], target f32 [B,4,h,w], timesteps i32 [B], sizes f32 [B,6]
    (original h/w, crop top/left, target h/w), loss_weights f32 [B], huber_c f32 [B],
    text_a, text_b, text_c: either (ids1 i32 [B*n,77], ids2 i32 [B*n,77], eos_mask2 f32 [B*n,77]) when the
    text encoders run in the step, or (context f32 [B,T,2048], pooled f32 [B,1280], unused) when their
    outputs are cached.
"""

from mindspore import mint, nn, ops
from mindone.diffusers.training_utils import TrainStep

from library.sdxl_unet import SizeEmbedding

LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")


class CachedConditioning(nn.Cell):
    """Text-encoder outputs computed before training: passed through unchanged."""

    def construct(self, context, pooled, unused):
        return context, pooled


class FrozenConditioning(nn.Cell):
    """Text encoders run in the step without training: no gradient flows into them."""

    def __init__(self, text_encoding: nn.Cell):
        super().__init__()
        self.text_encoding = text_encoding

    def construct(self, ids1, ids2, eos_mask2):
        context, pooled = self.text_encoding(ids1, ids2, eos_mask2)
        return ops.stop_gradient(context), ops.stop_gradient(pooled)


def per_sample_loss(prediction, target, loss_type: str, huber_c):
    """sd-scripts' conditional_loss with reduction "none", then the mean over all but the batch axis."""
    diff = prediction.astype(target.dtype) - target
    if loss_type == "l2":
        elementwise = diff * diff
    elif loss_type == "l1":
        elementwise = mint.abs(diff)
    else:
        c = huber_c.reshape(-1, 1, 1, 1)
        soft = mint.sqrt(diff * diff + c * c) - c
        elementwise = 2 * c * soft if loss_type == "huber" else 2 * soft
    return elementwise.mean(axis=(1, 2, 3))


class SDXLLoRALoss(nn.Cell):
    """(step inputs) -> scalar loss; the differentiable part of a step."""

    def __init__(self, unet: nn.Cell, conditioning: nn.Cell, loss_type: str = "l2"):
        super().__init__()
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}")
        self.unet = unet
        self.conditioning = conditioning
        self.size_embedding = SizeEmbedding()
        self.loss_type = loss_type

    def condition(self, sizes, text_a, text_b, text_c):
        """-> (context, y): the UNet's cross-attention context and vector conditioning."""
        context, pooled = self.conditioning(text_a, text_b, text_c)
        return context, self.size_embedding(pooled, sizes)

    def condition_unet(self, timesteps, sizes, text_a, text_b, text_c):
        """-> (context, emb): the conditioning as the UNet's blocks receive it."""
        context, y = self.condition(sizes, text_a, text_b, text_c)
        return context, self.unet.embedding(timesteps, y)

    def loss(self, prediction, target, loss_weights, huber_c):
        return (per_sample_loss(prediction, target, self.loss_type, huber_c) * loss_weights).mean()

    def construct(self, noisy_latents, target, timesteps, sizes, loss_weights, huber_c, text_a, text_b, text_c):
        context, y = self.condition(sizes, text_a, text_b, text_c)
        return self.loss(self.unet(noisy_latents, timesteps, context, y), target, loss_weights, huber_c)


class TrainStepForSDXLLoRA(TrainStep):
    """One optimizer step (or one accumulation micro-step): returns (loss, loss) for logging.

    mindone's TrainStep differentiates `forward` with has_aux=True, which needs a second output; the
    unscaled loss is that auxiliary output."""

    def __init__(self, loss_cell: SDXLLoRALoss, optimizer, max_grad_norm=None, gradient_accumulation_steps=1):
        super().__init__(
            loss_cell,
            optimizer,
            max_grad_norm=max_grad_norm if max_grad_norm and max_grad_norm > 0 else None,
            gradient_accumulation_steps=gradient_accumulation_steps,
            gradient_accumulation_kwargs={"sync_with_dataloader": False},
        )

    def forward(self, noisy_latents, target, timesteps, sizes, loss_weights, huber_c, text_a, text_b, text_c):
        loss = self.model(noisy_latents, target, timesteps, sizes, loss_weights, huber_c, text_a, text_b, text_c)
        return self.scale_loss(loss), ops.stop_gradient(loss)
