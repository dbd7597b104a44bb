"""The training-side diffusion math of sd-scripts, on the host in numpy.

Noise, timesteps, noisy latents, targets and per-sample loss weights are cheap to compute for a
batch of latents and depend only on a seeded numpy generator, so they are computed here rather than
in the compiled step: a resumed run that restores the generator state draws exactly the same values,
and each formula is testable against sd-scripts' definitions.
"""

from dataclasses import dataclass
from typing import Optional

import cv2
import numpy as np

NUM_TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 0.00085, 0.012


def sdxl_betas(zero_terminal_snr: bool = False) -> np.ndarray:
    """DDPM "scaled_linear" betas as SDXL (and sd-scripts) use them, float64."""
    betas = np.linspace(BETA_START**0.5, BETA_END**0.5, NUM_TRAIN_TIMESTEPS, dtype=np.float64) ** 2
    return _rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shift and scale sqrt(alpha_bar) so the last step has zero SNR and the first is unchanged
    (Lin et al. 2023, as sd-scripts' --zero_terminal_snr)."""
    sqrt_bar = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_bar[0], sqrt_bar[-1]
    sqrt_bar = (sqrt_bar - last) * first / (first - last)
    bar = sqrt_bar**2
    alphas = np.concatenate([bar[:1], bar[1:] / bar[:-1]])
    return 1.0 - alphas


@dataclass
class NoiseSettings:
    """The sd-scripts arguments that shape noise, timesteps and loss weights."""

    noise_offset: Optional[float] = None
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: Optional[float] = None
    multires_noise_iterations: Optional[int] = None
    multires_noise_discount: float = 0.3
    ip_noise_gamma: Optional[float] = None
    ip_noise_gamma_random_strength: bool = False
    min_timestep: Optional[int] = None
    max_timestep: Optional[int] = None
    v_parameterization: bool = False
    zero_terminal_snr: bool = False
    min_snr_gamma: Optional[float] = None
    scale_v_pred_loss_like_noise_pred: bool = False
    v_pred_like_loss: Optional[float] = None
    debiased_estimation_loss: bool = False
    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0

    @classmethod
    def from_args(cls, args) -> "NoiseSettings":
        return cls(**{name: getattr(args, name) for name in cls.__dataclass_fields__ if hasattr(args, name)})


@dataclass
class TrainingTargets:
    noisy_latents: np.ndarray  # float32 [B, 4, h, w]
    target: np.ndarray  # float32 [B, 4, h, w]: the noise, or the velocity with v-parameterization
    timesteps: np.ndarray  # int32 [B]
    loss_weights: np.ndarray  # float32 [B]: every per-sample factor sd-scripts multiplies the loss by
    huber_c: np.ndarray  # float32 [B]: the Huber threshold per sample (1.0 when unused)


class DiffusionTrainingMath:
    def __init__(self, settings: NoiseSettings):
        self.settings = settings
        betas = sdxl_betas(settings.zero_terminal_snr)
        self.alphas_cumprod = np.cumprod(1.0 - betas)
        with np.errstate(divide="ignore"):
            self.all_snr = self.alphas_cumprod / (1.0 - self.alphas_cumprod)

    @property
    def rows_are_coupled(self) -> bool:
        """Whether one row's noise depends on another row's latents: the multires noise is normalised by
        the std of the whole batch's noise, which holds each row's adaptive (latent-dependent) offset."""
        s = self.settings
        return bool(s.multires_noise_iterations and s.noise_offset and s.adaptive_noise_scale is not None)

    def sample_noise(self, latents: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        s = self.settings
        noise = rng.standard_normal(latents.shape).astype(np.float32)
        if s.noise_offset:
            offset = rng.random() * s.noise_offset if s.noise_offset_random_strength else s.noise_offset
            if s.adaptive_noise_scale is not None:
                channel_mean = np.abs(latents.mean(axis=(2, 3), keepdims=True))
                offset = np.clip(offset + s.adaptive_noise_scale * channel_mean, 0.0, None)
            noise = noise + offset * rng.standard_normal((latents.shape[0], latents.shape[1], 1, 1))
        if s.multires_noise_iterations:
            noise = self._pyramid_noise(noise, rng)
        return noise.astype(np.float32)

    def _pyramid_noise(self, noise: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Noise at successively coarser random scales, bilinearly upsampled and added with a decaying weight."""
        batch, channels, height, width = noise.shape
        noise = noise.astype(np.float32).copy()
        for i in range(self.settings.multires_noise_iterations):
            r = rng.random() * 2 + 2
            small_h, small_w = max(1, int(height / r**i)), max(1, int(width / r**i))
            coarse = rng.standard_normal((batch * channels, small_h, small_w)).astype(np.float32)
            upsampled = np.stack([cv2.resize(c, (width, height), interpolation=cv2.INTER_LINEAR) for c in coarse])
            noise += upsampled.reshape(noise.shape) * self.settings.multires_noise_discount**i
            if small_h == 1 or small_w == 1:
                break
        return noise / noise.std(ddof=1)

    def sample_timesteps(self, batch: int, rng: np.random.Generator) -> np.ndarray:
        low = self.settings.min_timestep or 0
        high = NUM_TRAIN_TIMESTEPS if self.settings.max_timestep is None else self.settings.max_timestep
        if low < high:
            return rng.integers(low, high, size=batch).astype(np.int32)
        return np.full(batch, high, np.int32)

    def add_noise(self, latents, noise, timesteps):
        bar = self.alphas_cumprod[timesteps].reshape(-1, 1, 1, 1)
        return (np.sqrt(bar) * latents + np.sqrt(1.0 - bar) * noise).astype(np.float32)

    def velocity(self, latents, noise, timesteps):
        bar = self.alphas_cumprod[timesteps].reshape(-1, 1, 1, 1)
        return (np.sqrt(bar) * noise - np.sqrt(1.0 - bar) * latents).astype(np.float32)

    def snr_loss_factor(self, timesteps: np.ndarray) -> np.ndarray:
        """sd-scripts' post_process_loss weights (min-SNR, v-pred scaling, v-pred-like loss, debiased), as one factor."""
        s = self.settings
        snr = self.all_snr[timesteps]
        clipped_snr = np.minimum(snr, 1000.0)
        factor = np.ones(len(timesteps), np.float64)
        if s.min_snr_gamma:
            gamma = np.minimum(snr, s.min_snr_gamma)
            factor *= gamma / (snr + 1) if s.v_parameterization else gamma / snr
        if s.scale_v_pred_loss_like_noise_pred:
            factor *= clipped_snr / (clipped_snr + 1)
        if s.v_pred_like_loss:
            factor *= 1.0 + s.v_pred_like_loss / (clipped_snr / (clipped_snr + 1))
        if s.debiased_estimation_loss:
            factor *= 1.0 / (clipped_snr + 1) if s.v_parameterization else 1.0 / np.sqrt(clipped_snr)
        return factor.astype(np.float32)

    def huber_threshold(self, timesteps: np.ndarray) -> np.ndarray:
        s = self.settings
        if s.loss_type not in ("huber", "smooth_l1"):
            return np.ones(len(timesteps), np.float32)
        if s.huber_schedule == "exponential":
            alpha = -np.log(s.huber_c) / NUM_TRAIN_TIMESTEPS
            return (np.exp(-alpha * timesteps) * s.huber_scale).astype(np.float32)
        if s.huber_schedule == "snr":
            bar = self.alphas_cumprod[timesteps]
            sigmas = np.sqrt((1.0 - bar) / bar)
            return ((1 - s.huber_c) / (1 + sigmas) ** 2 + s.huber_c).astype(np.float32)
        return np.full(len(timesteps), s.huber_c * s.huber_scale, np.float32)

    def prepare(self, latents: np.ndarray, sample_weights: np.ndarray, rng: np.random.Generator) -> TrainingTargets:
        """One batch: draw noise and timesteps, noise the latents, and compute target and loss weights."""
        s = self.settings
        noise = self.sample_noise(latents, rng)
        timesteps = self.sample_timesteps(latents.shape[0], rng)
        noised_with = noise
        if s.ip_noise_gamma:
            strength = rng.random() * s.ip_noise_gamma if s.ip_noise_gamma_random_strength else s.ip_noise_gamma
            noised_with = noise + strength * rng.standard_normal(latents.shape).astype(np.float32)
        noisy = self.add_noise(latents, noised_with, timesteps)
        target = self.velocity(latents, noise, timesteps) if s.v_parameterization else noise
        weights = np.asarray(sample_weights, np.float32) * self.snr_loss_factor(timesteps)
        return TrainingTargets(noisy, target.astype(np.float32), timesteps, weights.astype(np.float32),
                               self.huber_threshold(timesteps))
