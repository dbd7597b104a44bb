"""library/diffusion.py against sd-scripts' formulas, recomputed independently here."""

import math

import numpy as np
import pytest

from library.diffusion import DiffusionTrainingMath, NoiseSettings, sdxl_betas


def _alpha_bar(t, zero_terminal=False):
    product = 1.0
    for step in range(t + 1):
        beta = (math.sqrt(0.00085) + (math.sqrt(0.012) - math.sqrt(0.00085)) * step / 999) ** 2
        product *= 1.0 - beta
    return product


def test_schedule_matches_scaled_linear_ddpm():
    math_ = DiffusionTrainingMath(NoiseSettings())
    for t in (0, 1, 500, 999):
        assert math_.alphas_cumprod[t] == pytest.approx(_alpha_bar(t), rel=1e-12)


def test_zero_terminal_snr_keeps_first_step_and_zeroes_last():
    plain = np.cumprod(1 - sdxl_betas())
    fixed = np.cumprod(1 - sdxl_betas(zero_terminal_snr=True))
    assert fixed[0] == pytest.approx(plain[0], rel=1e-12)
    assert fixed[-1] == pytest.approx(0.0, abs=1e-20)
    assert np.all(np.diff(fixed) < 0)


def test_noisy_latents_and_targets():
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((3, 4, 2, 2)).astype(np.float32)
    eps_math = DiffusionTrainingMath(NoiseSettings())
    out = eps_math.prepare(latents, np.ones(3), np.random.default_rng(7))
    # The same generator sequence: noise first, then timesteps.
    replay = np.random.default_rng(7)
    noise = replay.standard_normal(latents.shape).astype(np.float32)
    timesteps = replay.integers(0, 1000, size=3)
    np.testing.assert_array_equal(out.timesteps, timesteps)
    np.testing.assert_array_equal(out.target, noise)
    for i, t in enumerate(timesteps):
        a = _alpha_bar(int(t))
        np.testing.assert_allclose(out.noisy_latents[i], math.sqrt(a) * latents[i] + math.sqrt(1 - a) * noise[i], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out.loss_weights, np.ones(3, np.float32))

    v_out = DiffusionTrainingMath(NoiseSettings(v_parameterization=True)).prepare(latents, np.ones(3), np.random.default_rng(7))
    for i, t in enumerate(timesteps):
        a = _alpha_bar(int(t))
        np.testing.assert_allclose(v_out.target[i], math.sqrt(a) * noise[i] - math.sqrt(1 - a) * latents[i], rtol=1e-5, atol=1e-6)


def test_timestep_range_and_fixed_timestep():
    math_ = DiffusionTrainingMath(NoiseSettings(min_timestep=100, max_timestep=200))
    t = math_.sample_timesteps(10000, np.random.default_rng(0))
    assert t.min() == 100 and t.max() == 199
    fixed = DiffusionTrainingMath(NoiseSettings(min_timestep=300, max_timestep=300))
    assert set(fixed.sample_timesteps(5, np.random.default_rng(0))) == {300}


def test_loss_weights_min_snr_debiased_and_prior():
    t = np.array([10, 500, 990])
    snr = np.array([_alpha_bar(int(x)) / (1 - _alpha_bar(int(x))) for x in t])
    min_snr = DiffusionTrainingMath(NoiseSettings(min_snr_gamma=5.0))
    np.testing.assert_allclose(min_snr.snr_loss_factor(t), np.minimum(snr, 5.0) / snr, rtol=1e-5)
    min_snr_v = DiffusionTrainingMath(NoiseSettings(min_snr_gamma=5.0, v_parameterization=True))
    np.testing.assert_allclose(min_snr_v.snr_loss_factor(t), np.minimum(snr, 5.0) / (snr + 1), rtol=1e-5)
    debiased = DiffusionTrainingMath(NoiseSettings(debiased_estimation_loss=True))
    np.testing.assert_allclose(debiased.snr_loss_factor(t), 1 / np.sqrt(np.minimum(snr, 1000)), rtol=1e-5)
    scaled = DiffusionTrainingMath(NoiseSettings(scale_v_pred_loss_like_noise_pred=True))
    np.testing.assert_allclose(scaled.snr_loss_factor(t), snr / (snr + 1), rtol=1e-5)
    latents = np.zeros((2, 4, 2, 2), np.float32)
    out = DiffusionTrainingMath(NoiseSettings()).prepare(latents, np.array([1.0, 0.25]), np.random.default_rng(0))
    np.testing.assert_array_equal(out.loss_weights, [1.0, 0.25])


def test_huber_thresholds():
    t = np.array([0, 250, 999])
    snr_sched = DiffusionTrainingMath(NoiseSettings(loss_type="huber", huber_schedule="snr", huber_c=0.1))
    sigmas = np.array([math.sqrt((1 - _alpha_bar(int(x))) / _alpha_bar(int(x))) for x in t])
    np.testing.assert_allclose(snr_sched.huber_threshold(t), 0.9 / (1 + sigmas) ** 2 + 0.1, rtol=1e-5)
    exp_sched = DiffusionTrainingMath(NoiseSettings(loss_type="smooth_l1", huber_schedule="exponential", huber_c=0.1, huber_scale=2.0))
    np.testing.assert_allclose(exp_sched.huber_threshold(t), 2.0 * np.exp(np.log(0.1) / 1000 * t), rtol=1e-5)
    const = DiffusionTrainingMath(NoiseSettings(loss_type="huber", huber_schedule="constant", huber_c=0.3, huber_scale=2.0))
    np.testing.assert_allclose(const.huber_threshold(t), [0.6, 0.6, 0.6], rtol=1e-6)


def test_noise_offset_shifts_channel_means_and_pyramid_noise_is_unit_variance():
    latents = np.zeros((64, 4, 8, 8), np.float32)
    plain = DiffusionTrainingMath(NoiseSettings()).sample_noise(latents, np.random.default_rng(0))
    offset = DiffusionTrainingMath(NoiseSettings(noise_offset=0.5)).sample_noise(latents, np.random.default_rng(0))
    assert plain.mean(axis=(2, 3)).std() < 0.2 < offset.mean(axis=(2, 3)).std()
    pyramid = DiffusionTrainingMath(NoiseSettings(multires_noise_iterations=6, multires_noise_discount=0.3))
    noise = pyramid.sample_noise(np.zeros((2, 4, 32, 32), np.float32), np.random.default_rng(0))
    assert noise.std(ddof=1) == pytest.approx(1.0, rel=1e-4)
    assert np.abs(np.corrcoef(noise[0, 0, :, :-1].ravel(), noise[0, 0, :, 1:].ravel())[0, 1]) > 0.05
