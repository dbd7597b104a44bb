"""Samplers for SDXL's DDPM noise schedule, on the host in numpy.

Each sampler reproduces the diffusers scheduler that sd-scripts' `--sample_sampler` selects, with the
settings sd-scripts gives it (`get_my_scheduler`: scaled_linear betas 0.00085..0.012 over 1000 steps,
every other option at diffusers 0.32's default, clip_sample forced on where the scheduler has it).
A sampler is a plan of model evaluations plus the update that follows each one:

    latents = noise * sampler.init_noise_sigma
    for index, timestep in enumerate(sampler.timesteps):
        model_output = unet(sampler.scale_model_input(latents, index), timestep)
        latents = sampler.step(model_output, index, latents, rng)

which `run_sampler` spells out. The arithmetic is a few vector operations per step, so it runs in
numpy on every device; with a seeded generator the same seed gives the same latents everywhere.

Two families: DDIM and DPM-Solver++ work on x_t = sqrt(abar) x0 + sqrt(1 - abar) noise ("VP"),
the k-diffusion samplers (Euler, LMS, Heun, DPM2) on x = x0 + sigma noise with
sigma = sqrt((1 - abar) / abar), and feed the UNet x / sqrt(sigma^2 + 1).
"""

import math
from typing import Callable, Optional

import numpy as np
from numpy.polynomial import Polynomial

from library.diffusion import NUM_TRAIN_TIMESTEPS, sdxl_betas
from library.errors import UserError

# sd-scripts' --sample_sampler choices, in its order.
SAMPLER_CHOICES = (
    "ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++",
    "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a",
)
UNSUPPORTED_SAMPLERS = {
    "pndm": "not implemented here",
    "dpmsingle": "not implemented here",
    # diffusers refuses DPMSolverMultistepScheduler(algorithm_type="dpmsolver") with its default final
    # sigma of zero, so sd-scripts fails on it too.
    "dpmsolver": "sd-scripts' diffusers rejects it as configured (final_sigmas_type 'zero')",
}
PREDICTION_TYPES = ("epsilon", "v_prediction")


def _alphas_cumprod() -> np.ndarray:
    # Sampling never uses --zero_terminal_snr: sd-scripts' sample scheduler is built without it.
    return np.cumprod(1.0 - sdxl_betas())


def _train_sigmas() -> np.ndarray:
    alphas_cumprod = _alphas_cumprod()
    return np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)


def _sigma_to_timestep(sigma: np.ndarray) -> np.ndarray:
    """The fractional timestep whose sigma, interpolated linearly in log sigma, equals `sigma`."""
    log_sigmas = np.log(_train_sigmas())
    return np.interp(np.log(np.maximum(sigma, 1e-10)), log_sigmas, np.arange(NUM_TRAIN_TIMESTEPS, dtype=np.float64))


class Sampler:
    """One image's denoising plan. Stateful (multistep history, pending half steps): one per image."""

    timesteps: np.ndarray  # float64, what the UNet is given at each model evaluation
    init_noise_sigma: float = 1.0

    def __init__(self, prediction_type: str):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        self.prediction_type = prediction_type

    def scale_model_input(self, sample: np.ndarray, index: int) -> np.ndarray:
        return sample

    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError


def run_sampler(
    sampler: Sampler,
    model: Callable[[np.ndarray, float], np.ndarray],
    noise: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """Denoise `noise` (unit Gaussian) with `model(model_input, timestep) -> model_output`."""
    latents = noise * sampler.init_noise_sigma
    for index, timestep in enumerate(sampler.timesteps):
        model_output = model(sampler.scale_model_input(latents, index), float(timestep))
        latents = sampler.step(model_output, index, latents, rng)
    return latents


# ---- VP samplers: DDIM, DPM-Solver++ --------------------------------------------------------------


def _vp_denoised(model_output, sample, alpha_bar: float, prediction_type: str):
    """(x0, noise) predicted from the model output at a VP sample with cumulative alpha `alpha_bar`."""
    signal, noise_level = alpha_bar**0.5, (1.0 - alpha_bar) ** 0.5
    if prediction_type == "epsilon":
        return (sample - noise_level * model_output) / signal, model_output
    return signal * sample - noise_level * model_output, signal * model_output + noise_level * sample


class DDIMSampler(Sampler):
    """Deterministic DDIM (eta 0), "leading" timesteps, predicted x0 clipped to [-1, 1]."""

    def __init__(self, steps: int, prediction_type: str = "epsilon"):
        super().__init__(prediction_type)
        self.step_ratio = NUM_TRAIN_TIMESTEPS // steps
        self.timesteps = (np.arange(steps) * self.step_ratio)[::-1].astype(np.float64)
        self.alphas_cumprod = _alphas_cumprod()

    def step(self, model_output, index, sample, rng):
        timestep = int(self.timesteps[index])
        previous = timestep - self.step_ratio
        alpha_bar = float(self.alphas_cumprod[timestep])
        # diffusers' set_alpha_to_one: the step past timestep 0 lands on the clean sample.
        alpha_bar_prev = float(self.alphas_cumprod[previous]) if previous >= 0 else 1.0
        denoised, noise = _vp_denoised(model_output, sample, alpha_bar, self.prediction_type)
        denoised = np.clip(denoised, -1.0, 1.0)
        return alpha_bar_prev**0.5 * denoised + (1.0 - alpha_bar_prev) ** 0.5 * noise


class DPMSolverPlusPlusSampler(Sampler):
    """DPM-Solver++ 2M (midpoint): first order on the first and the last step, second order between."""

    def __init__(self, steps: int, prediction_type: str = "epsilon"):
        super().__init__(prediction_type)
        self.timesteps = np.linspace(0, NUM_TRAIN_TIMESTEPS - 1, steps + 1).round()[::-1][:-1].copy()
        self.sigmas = np.append(_train_sigmas()[self.timesteps.astype(int)], 0.0)
        self.previous_denoised = None

    def step(self, model_output, index, sample, rng):
        sigma, sigma_next = float(self.sigmas[index]), float(self.sigmas[index + 1])
        alpha_bar = 1.0 / (sigma**2 + 1.0)
        denoised, _ = _vp_denoised(model_output, sample, alpha_bar, self.prediction_type)
        previous, self.previous_denoised = self.previous_denoised, denoised
        if sigma_next == 0.0:
            # The update to sigma 0 is exactly the current denoised estimate.
            return denoised

        # In VP terms: alpha = 1/sqrt(sigma^2+1), sigma_vp = sigma * alpha, lambda = log(alpha/sigma_vp) = -log(sigma).
        alpha_next = 1.0 / (sigma_next**2 + 1.0) ** 0.5
        h = math.log(sigma / sigma_next)
        decay = math.expm1(-h)  # exp(-h) - 1
        vp_ratio = (sigma_next * alpha_next) / (sigma / (sigma**2 + 1.0) ** 0.5)
        if previous is None:
            return vp_ratio * sample - alpha_next * decay * denoised
        h_previous = math.log(float(self.sigmas[index - 1]) / sigma)
        correction = (h / h_previous) * (denoised - previous)
        return vp_ratio * sample - alpha_next * decay * denoised - 0.5 * alpha_next * decay * correction


# ---- Sigma-space (k-diffusion) samplers: Euler, Euler a, LMS, Heun, DPM2, DPM2 a -------------------


class SigmaSampler(Sampler):
    """x = x0 + sigma noise over "linspace" timesteps, sigmas interpolated linearly between training steps."""

    def __init__(self, steps: int, prediction_type: str = "epsilon"):
        super().__init__(prediction_type)
        step_timesteps = np.linspace(0, NUM_TRAIN_TIMESTEPS - 1, steps)[::-1].copy()
        self.step_timesteps = step_timesteps
        self.sigmas = np.append(np.interp(step_timesteps, np.arange(NUM_TRAIN_TIMESTEPS), _train_sigmas()), 0.0)
        # With "linspace" spacing diffusers starts from sigma_max, not sqrt(sigma_max^2 + 1).
        self.init_noise_sigma = float(self.sigmas.max())
        self.timesteps = step_timesteps
        self.input_sigmas = self.sigmas[:-1]

    def scale_model_input(self, sample, index):
        return sample / (float(self.input_sigmas[index]) ** 2 + 1.0) ** 0.5

    def denoised(self, model_output, sample, sigma: float):
        if self.prediction_type == "epsilon":
            return sample - sigma * model_output
        return sample / (sigma**2 + 1.0) - sigma / (sigma**2 + 1.0) ** 0.5 * model_output


class EulerSampler(SigmaSampler):
    def step(self, model_output, index, sample, rng):
        sigma, sigma_next = float(self.sigmas[index]), float(self.sigmas[index + 1])
        derivative = (sample - self.denoised(model_output, sample, sigma)) / sigma
        return sample + derivative * (sigma_next - sigma)


def _ancestral_sigmas(sigma_from: np.ndarray, sigma_to: np.ndarray):
    """(sigma_down, sigma_up): step deterministically to sigma_down, then add fresh noise of sigma_up."""
    sigma_up = np.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2)
    return np.sqrt(sigma_to**2 - sigma_up**2), sigma_up


class EulerAncestralSampler(SigmaSampler):
    def step(self, model_output, index, sample, rng):
        sigma = float(self.sigmas[index])
        sigma_down, sigma_up = (float(s) for s in _ancestral_sigmas(self.sigmas[index], self.sigmas[index + 1]))
        derivative = (sample - self.denoised(model_output, sample, sigma)) / sigma
        noise = rng.standard_normal(sample.shape)
        return sample + derivative * (sigma_down - sigma) + (noise * sigma_up).astype(sample.dtype)


class LMSSampler(SigmaSampler):
    """Linear multistep of order 4 over the derivative history (fewer on the first steps)."""

    order = 4

    def __init__(self, steps: int, prediction_type: str = "epsilon"):
        super().__init__(steps, prediction_type)
        self.derivatives = []

    def step(self, model_output, index, sample, rng):
        sigma = float(self.sigmas[index])
        self.derivatives = [(sample - self.denoised(model_output, sample, sigma)) / sigma, *self.derivatives]
        self.derivatives = self.derivatives[: self.order]
        order = len(self.derivatives)
        update = sum(self._coefficient(order, index, j) * d for j, d in enumerate(self.derivatives))
        return sample + update

    def _coefficient(self, order: int, index: int, j: int) -> float:
        """Integral from sigma_index to sigma_index+1 of the Lagrange basis polynomial through the last
        `order` sigmas that is 1 at sigma_(index - j). Exact, where diffusers uses scipy's quadrature."""
        nodes = [float(self.sigmas[index - k]) for k in range(order)]
        basis = Polynomial([1.0])
        for k, node in enumerate(nodes):
            if k != j:
                basis *= Polynomial([-node, 1.0]) / (nodes[j] - node)
        antiderivative = basis.integ()
        return float(antiderivative(self.sigmas[index + 1]) - antiderivative(self.sigmas[index]))


class TwoStageSampler(SigmaSampler):
    """Two model evaluations per step: a predictor at sigma_k that moves to `mid_sigmas[k]`, then a
    corrector evaluated there that restarts from the step's start and moves to `end_sigmas[k]` (plus
    `up_sigmas[k]` of fresh noise). The last step ends at sigma 0, where the corrector's derivative does
    not exist, so it is a single Euler step. N steps thus take 2N - 1 evaluations: even indices are
    predictors of step index / 2, odd ones correctors of step index // 2.
    """

    average_derivatives = False  # Heun averages both stages' slopes; DPM2 uses the midpoint slope
    clip_denoised = False

    def _plan(self, mid_sigmas, mid_timesteps, end_sigmas, up_sigmas):
        steps = len(self.sigmas) - 1
        self.mid_sigmas, self.end_sigmas, self.up_sigmas = mid_sigmas, end_sigmas, up_sigmas
        self.timesteps = np.empty(2 * steps - 1)
        self.timesteps[0::2], self.timesteps[1::2] = self.step_timesteps, mid_timesteps[: steps - 1]
        self.input_sigmas = np.empty(2 * steps - 1)
        self.input_sigmas[0::2], self.input_sigmas[1::2] = self.sigmas[:-1], mid_sigmas[: steps - 1]
        self.pending = None

    def _denoised(self, model_output, sample, sigma):
        denoised = self.denoised(model_output, sample, sigma)
        return np.clip(denoised, -1.0, 1.0) if self.clip_denoised else denoised

    def step(self, model_output, index, sample, rng):
        k = index // 2
        sigma = float(self.sigmas[k])
        if index % 2 == 0:
            derivative = (sample - self._denoised(model_output, sample, sigma)) / sigma
            self.pending = (sample, derivative)
            return sample + derivative * (float(self.mid_sigmas[k]) - sigma)

        start, first_derivative = self.pending
        self.pending = None
        mid_sigma = float(self.mid_sigmas[k])
        derivative = (sample - self._denoised(model_output, sample, mid_sigma)) / mid_sigma
        if self.average_derivatives:
            derivative = (first_derivative + derivative) / 2
        result = start + derivative * (float(self.end_sigmas[k]) - sigma)
        up = float(self.up_sigmas[k])
        if up > 0.0:
            result = result + (rng.standard_normal(sample.shape) * up).astype(sample.dtype)
        return result


class HeunSampler(TwoStageSampler):
    # sd-scripts turns on clip_sample for every scheduler that has it; diffusers' Heun does.
    average_derivatives = True
    clip_denoised = True

    def __init__(self, steps: int, prediction_type: str = "epsilon"):
        super().__init__(steps, prediction_type)
        next_sigmas = self.sigmas[1:]
        self._plan(next_sigmas, self.step_timesteps[1:], next_sigmas, np.zeros_like(next_sigmas))


class DPM2Sampler(TwoStageSampler):
    """DPM-Solver-2 (k-diffusion's sample_dpm_2): the corrector sits at the geometric mean of the sigmas."""

    def __init__(self, steps: int, prediction_type: str = "epsilon"):
        super().__init__(steps, prediction_type)
        next_sigmas = self.sigmas[1:]
        mid_sigmas = np.sqrt(self.sigmas[:-1] * next_sigmas)
        self._plan(mid_sigmas, _sigma_to_timestep(mid_sigmas), next_sigmas, np.zeros_like(next_sigmas))


class DPM2AncestralSampler(TwoStageSampler):
    def __init__(self, steps: int, prediction_type: str = "epsilon"):
        super().__init__(steps, prediction_type)
        down_sigmas, up_sigmas = _ancestral_sigmas(self.sigmas[:-1], self.sigmas[1:])
        mid_sigmas = np.sqrt(self.sigmas[:-1] * down_sigmas)
        self._plan(mid_sigmas, _sigma_to_timestep(mid_sigmas), down_sigmas, up_sigmas)


SAMPLERS = {
    "ddim": DDIMSampler,
    "dpmsolver++": DPMSolverPlusPlusSampler,
    "euler": EulerSampler,
    "k_euler": EulerSampler,
    "euler_a": EulerAncestralSampler,
    "k_euler_a": EulerAncestralSampler,
    "lms": LMSSampler,
    "k_lms": LMSSampler,
    "heun": HeunSampler,
    "dpm_2": DPM2Sampler,
    "k_dpm_2": DPM2Sampler,
    "dpm_2_a": DPM2AncestralSampler,
    "k_dpm_2_a": DPM2AncestralSampler,
}


def check_sampler_name(name: str, source: str = "--sample_sampler") -> str:
    """`name` if it is a sampler this trainer can run; a UserError naming `source` otherwise."""
    if name in SAMPLERS:
        return name
    if name in UNSUPPORTED_SAMPLERS:
        raise UserError(
            f"{source}: sampler {name!r} is not supported ({UNSUPPORTED_SAMPLERS[name]}); "
            f"use one of {', '.join(SAMPLERS)}"
        )
    raise UserError(f"{source}: unknown sampler {name!r}; use one of {', '.join(SAMPLERS)}")


def make_sampler(name: str, steps: int, prediction_type: str = "epsilon", source: Optional[str] = None) -> Sampler:
    """A fresh sampler `name` (an sd-scripts --sample_sampler value) planned for `steps` steps."""
    check_sampler_name(name, source or "--sample_sampler")
    if not 1 <= steps <= NUM_TRAIN_TIMESTEPS:
        raise UserError(f"{source or name}: sampling steps must be 1 to {NUM_TRAIN_TIMESTEPS}, got {steps}")
    return SAMPLERS[name](steps, prediction_type)
