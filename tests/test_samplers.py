import numpy as np
import pytest

import mindspore as ms

from library.errors import UserError
from library.samplers import SAMPLER_CHOICES, SAMPLERS, UNSUPPORTED_SAMPLERS, make_sampler, run_sampler

# SDXL's training schedule, computed here independently of the library.
BETAS = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
ALPHAS_CUMPROD = np.cumprod(1.0 - BETAS)
TRAIN_SIGMAS = np.sqrt((1.0 - ALPHAS_CUMPROD) / ALPHAS_CUMPROD)


def sigma_at(timestep: float) -> float:
    """Sigma of a (fractional) timestep, interpolated in log sigma: exact at integer timesteps and at
    the fractional timesteps DPM2 derives from log-interpolated sigmas."""
    return float(np.exp(np.interp(timestep, np.arange(1000), np.log(TRAIN_SIGMAS))))


def toy_model(prediction_type: str, mean: float, std: float):
    """The exact denoiser for data ~ N(mean, std^2) per element, as a UNet would be called: the input is
    x / sqrt(sigma^2 + 1) for x = x0 + sigma noise."""

    def model(model_input, timestep):
        sigma = sigma_at(timestep)
        x = model_input * np.sqrt(sigma**2 + 1)
        denoised = mean + std**2 / (std**2 + sigma**2) * (x - mean)
        noise = (x - denoised) / sigma
        if prediction_type == "epsilon":
            return noise
        alpha, sigma_vp = 1 / np.sqrt(sigma**2 + 1), sigma / np.sqrt(sigma**2 + 1)
        return alpha * noise - sigma_vp * denoised

    return model


# ---- Plans --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, steps, timesteps",
    [
        ("ddim", 4, [750, 500, 250, 0]),  # "leading": 1000 // 4 = 250 apart, ending at 0
        ("ddim", 3, [666, 333, 0]),
        ("euler", 4, [999, 666, 333, 0]),  # "linspace" over 0..999
        ("euler_a", 4, [999, 666, 333, 0]),
        ("lms", 4, [999, 666, 333, 0]),
        ("dpmsolver++", 4, [999, 749, 500, 250]),  # linspace(0, 999, 5) rounded, the 0 dropped
        ("heun", 3, [999, 499.5, 499.5, 0, 0]),  # each step after the first evaluated twice
    ],
)
def test_samplers_visit_the_expected_timesteps(name, steps, timesteps):
    assert make_sampler(name, steps).timesteps.tolist() == timesteps


def test_ddim_at_sd_scripts_default_30_steps():
    timesteps = make_sampler("ddim", 30).timesteps
    assert (timesteps[0], timesteps[1], timesteps[-1], len(timesteps)) == (957, 924, 0, 30)


@pytest.mark.parametrize("name", ["dpm_2", "dpm_2_a"])
def test_dpm2_evaluates_between_steps_at_the_log_midpoint(name):
    sampler = make_sampler(name, 3)
    timesteps = sampler.timesteps
    assert len(timesteps) == 5 and timesteps[[0, 2, 4]].tolist() == [999, 499.5, 0]
    for k in range(2):
        sigma_from, mid = sigma_at(timesteps[2 * k]), sigma_at(timesteps[2 * k + 1])
        sigma_to = sigma_at(timesteps[2 * k + 2])
        if name == "dpm_2_a":
            sigma_up = np.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2)
            sigma_to = np.sqrt(sigma_to**2 - sigma_up**2)
        assert mid == pytest.approx(np.sqrt(sigma_from * sigma_to), rel=1e-3)


def test_initial_noise_scale():
    # Sigma-space samplers start at the largest sigma (linspace spacing), VP samplers at unit variance.
    assert TRAIN_SIGMAS[-1] == pytest.approx(14.6146, abs=1e-4)
    for name in ("euler", "euler_a", "lms", "heun", "dpm_2", "dpm_2_a"):
        assert make_sampler(name, 10).init_noise_sigma == pytest.approx(TRAIN_SIGMAS[-1], rel=1e-9)
    for name in ("ddim", "dpmsolver++"):
        assert make_sampler(name, 10).init_noise_sigma == 1.0


def test_every_sd_scripts_choice_is_supported_or_refused_by_name():
    assert set(SAMPLERS) | set(UNSUPPORTED_SAMPLERS) == set(SAMPLER_CHOICES)
    for name in UNSUPPORTED_SAMPLERS:
        with pytest.raises(UserError, match=f"sampler '{name}' is not supported"):
            make_sampler(name, 10)
    with pytest.raises(UserError, match="unknown sampler 'euler_b'"):
        make_sampler("euler_b", 10)
    with pytest.raises(UserError, match="steps must be 1 to 1000, got 0"):
        make_sampler("euler", 0)


# ---- Against diffusers (mindone's port, the same formulas as the schedulers sd-scripts builds) ----------

DIFFUSERS_CLASSES = {
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "dpmsolver++": "DPMSolverMultistepScheduler",
    "lms": "LMSDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
}


def diffusers_reference(name, prediction_type, steps, model, noise, seed):
    import mindone.diffusers as diffusers

    scheduler = getattr(diffusers, DIFFUSERS_CLASSES[name])(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type=prediction_type,
    )
    if hasattr(scheduler.config, "clip_sample"):
        scheduler.config.clip_sample = True  # as sd-scripts' get_my_scheduler
    scheduler.set_timesteps(steps)
    generator = np.random.default_rng(seed)
    sample = ms.Tensor(noise) * scheduler.init_noise_sigma
    for timestep in scheduler.timesteps:
        model_input = scheduler.scale_model_input(sample, timestep).asnumpy()
        output = ms.Tensor(model(model_input, float(timestep.asnumpy())).astype(np.float32))
        extra = {"generator": generator} if name == "euler_a" else {}
        sample = scheduler.step(output, timestep, sample, return_dict=False, **extra)[0]
    return scheduler.timesteps.asnumpy(), sample.asnumpy()


@pytest.mark.parametrize(
    "name, prediction_type",
    [(name, prediction_type) for name in DIFFUSERS_CLASSES for prediction_type in ("epsilon", "v_prediction")
     # diffusers' LMS integrates with scipy over MindSpore tensors (seconds per step); its v-prediction
     # conversion is the one Euler uses, tested there.
     if (name, prediction_type) != ("lms", "v_prediction")],
)
def test_matches_diffusers_scheduler(name, prediction_type):
    def model(model_input, timestep):
        # Not a denoiser: an arbitrary smooth function of input and timestep, so every term of the update counts.
        return np.tanh(0.7 * model_input + np.sin(timestep / 100.0)).astype(np.float32)

    # LMS reaches its full order 4 on the 4th step; 5 steps also slide its history window once.
    steps, seed = (5 if name == "lms" else 7), 5
    noise = np.random.default_rng(1).standard_normal((1, 4, 3, 3)).astype(np.float32)
    reference_timesteps, expected = diffusers_reference(name, prediction_type, steps, model, noise, seed)

    sampler = make_sampler(name, steps, prediction_type)
    result = run_sampler(sampler, model, noise, np.random.default_rng(seed))
    np.testing.assert_allclose(sampler.timesteps, reference_timesteps, atol=1e-3)
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


# ---- DPM2 against k-diffusion's loop (diffusers' KDPM2 schedulers have no MindSpore CPU kernel) ---------


def k_diffusion_dpm_2(denoise, x, sigmas, ancestral, rng):
    """k-diffusion's sample_dpm_2 / sample_dpm_2_ancestral, written from the paper's update rule."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_to = sigmas[i], sigmas[i + 1]
        sigma_up = 0.0
        if ancestral:
            sigma_up = np.sqrt(sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2)
            sigma_to = np.sqrt(sigma_to**2 - sigma_up**2)
        d = (x - denoise(x, sigma)) / sigma
        if sigma_to == 0:
            x = x + d * (sigma_to - sigma)
        else:
            sigma_mid = np.exp((np.log(sigma) + np.log(sigma_to)) / 2)
            x_mid = x + d * (sigma_mid - sigma)
            d_mid = (x_mid - denoise(x_mid, sigma_mid)) / sigma_mid
            x = x + d_mid * (sigma_to - sigma)
            if ancestral:
                x = x + rng.standard_normal(x.shape) * sigma_up
    return x


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", ["dpm_2", "dpm_2_a"])
def test_dpm2_matches_k_diffusion(name, prediction_type):
    model = toy_model(prediction_type, mean=0.2, std=0.6)

    def denoise(x, sigma):
        # Back from sigma to the timestep the UNet would be given, inverting sigma_at.
        timestep = np.interp(np.log(sigma), np.log(TRAIN_SIGMAS), np.arange(1000))
        output = model(x / np.sqrt(sigma**2 + 1), timestep)
        if prediction_type == "epsilon":
            return x - sigma * output
        return x / (sigma**2 + 1) - sigma / np.sqrt(sigma**2 + 1) * output

    steps = 10  # linspace timesteps 111 apart: integers, where linear and log sigma interpolation agree
    sigmas = np.append([sigma_at(t) for t in np.linspace(999, 0, steps)], 0.0)
    noise = np.random.default_rng(2).standard_normal(64)
    expected = k_diffusion_dpm_2(denoise, noise * sigmas[0], sigmas, name == "dpm_2_a", np.random.default_rng(3))
    result = run_sampler(make_sampler(name, steps, prediction_type), model, noise, np.random.default_rng(3))
    np.testing.assert_allclose(result, expected, rtol=1e-6, atol=1e-9)


# ---- Toy data whose answer is known -------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_point_data_is_reached_exactly(name, prediction_type):
    # Data that is a single value: the exact denoiser always predicts it, the probability-flow path is a
    # straight line in sigma that every solver follows exactly, and every sampler must end on the value.
    model = toy_model(prediction_type, mean=0.4, std=0.0)
    noise = np.random.default_rng(0).standard_normal(100)
    result = run_sampler(make_sampler(name, 10, prediction_type), model, noise, np.random.default_rng(1))
    np.testing.assert_allclose(result, 0.4, atol=1e-6)


def ode_error(name, steps, mean=0.1, std=0.15):
    """Mean error relative to the exact probability-flow ODE solution for Gaussian data, which maps the
    start x_T at sigma_T to mean + (x_T - mean) * std / sqrt(std^2 + sigma_T^2)."""
    sampler = make_sampler(name, steps)
    noise = np.random.default_rng(0).standard_normal(10000)
    sigma_start = sigma_at(sampler.timesteps[0])
    # VP samplers start from unit noise at sqrt(abar) x0 + sqrt(1 - abar) noise, i.e. x_T = noise / sqrt(abar).
    start = noise * (sampler.init_noise_sigma if sampler.init_noise_sigma != 1.0 else np.sqrt(sigma_start**2 + 1))
    exact = mean + (start - mean) * std / np.sqrt(std**2 + sigma_start**2)
    result = run_sampler(sampler, toy_model("epsilon", mean, std), noise, None)
    return np.abs(result - exact).mean() / np.abs(exact - mean).mean()


@pytest.mark.parametrize("name", ["euler", "ddim", "dpmsolver++", "lms", "heun", "dpm_2"])
def test_deterministic_samplers_converge_to_the_exact_ode_solution(name):
    # Step counts whose linspace timesteps are integers (999 = 27 * 37 = 111 * 9).
    coarse, fine = ode_error(name, 28), ode_error(name, 112)
    assert fine < 0.16 and fine < 0.6 * coarse


@pytest.mark.parametrize("name", ["lms", "heun", "dpm_2"])
def test_higher_order_samplers_beat_euler(name):
    assert ode_error(name, 112) < ode_error("euler", 112) / 10


@pytest.mark.parametrize("name", ["euler_a", "dpm_2_a"])
def test_ancestral_samplers_draw_from_the_data_distribution(name):
    mean, std = 0.5, 1.0
    noise = np.random.default_rng(0).standard_normal(40000)
    result = run_sampler(make_sampler(name, 112), toy_model("epsilon", mean, std), noise, np.random.default_rng(1))
    assert result.mean() == pytest.approx(mean, abs=0.03)
    assert result.std() == pytest.approx(std, rel=0.05)


@pytest.mark.parametrize("name", ["ddim", "heun"])
def test_predicted_clean_sample_is_clipped_to_unit_range(name):
    # sd-scripts switches clip_sample on for DDIM and Heun. One step lands on the clipped prediction.
    noise = np.full(4, 0.5)

    def far_outside(model_input, timestep):
        return np.full_like(model_input, -50.0)  # epsilon pointing to x0 far above 1

    np.testing.assert_allclose(run_sampler(make_sampler(name, 1), far_outside, noise, None), 1.0, atol=1e-12)
