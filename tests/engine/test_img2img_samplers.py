"""Image-to-image and inpainting schedules against diffusers' schedulers, driven exactly as diffusers'
StableDiffusionImg2ImgPipeline (truncated timesteps, `add_noise` at the first kept one), its inpainting pipeline
with an ordinary 4-channel UNet (the known region re-noised after every step) and LCM's own img2img pipeline
(strength passed to `set_timesteps`) drive them, around the stand-in network of test_samplers.

Tolerance: max |ours - diffusers| <= 1e-4 on the final latents, as for text to image.
"""

import inspect

import numpy as np
import pytest
import torch

from diffrt.engine.samplers import SAMPLERS, denoise, initial, keep_known
from diffrt.engine.schedules import first_step, make_schedule
from diffrt.errors import BadInput
from tests.engine.test_samplers import CONFIGS, DIFFUSERS, SD1, SD2, TOL, stand_in_unet

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
STRENGTHS = [0.3, 0.6, 1.0]


def spatial_unet(x: np.ndarray, t: float) -> np.ndarray:
    """The stand-in network plus a vertical neighbour term, so the repainted half sees the kept half."""
    return stand_in_unet(x, t) + np.float32(0.3) * np.tanh(np.roll(x, 1, axis=2) - np.roll(x, -1, axis=2))


def draws(seed: int, shape=(2, 4, 8, 8)):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.8)  # clean latents
    eps = rng.standard_normal(shape, dtype=np.float32)
    mask = np.zeros((1, 1, *shape[2:]), np.float32)
    mask[..., : shape[2] // 2, :] = 1.0  # repaint the top half
    return z, eps, mask


def run_diffusers(sampler, config, steps, strength, z, eps, mask=None, lcm_own=False, net=stand_in_unet):
    cls, overrides = DIFFUSERS[sampler]
    scheduler = cls.from_config(dict(config), **overrides)
    if lcm_own:  # LatentConsistencyModelImg2ImgPipeline
        scheduler.set_timesteps(steps, strength=strength)
        timesteps = scheduler.timesteps
    else:  # the img2img / inpaint pipelines' get_timesteps
        scheduler.set_timesteps(steps)
        t_start = max(steps - min(int(steps * strength), steps), 0)
        timesteps = scheduler.timesteps[t_start * scheduler.order :]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(t_start * scheduler.order)
    zt, et = torch.from_numpy(z), torch.from_numpy(eps)
    if mask is not None and strength == 1.0:  # inpainting at full strength starts from pure noise
        x = et * scheduler.init_noise_sigma
    else:
        x = scheduler.add_noise(zt, et, timesteps[:1].repeat(z.shape[0]))
    extra = {"eta": 0.0} if "eta" in inspect.signature(scheduler.step).parameters else {}
    m = None if mask is None else torch.from_numpy(mask)
    for i, t in enumerate(timesteps):
        out = torch.from_numpy(net(scheduler.scale_model_input(x, t).numpy(), float(t)))
        x = scheduler.step(out, t, x, **extra, return_dict=False)[0]
        if m is not None:
            known = zt
            if i < len(timesteps) - 1:
                known = scheduler.add_noise(zt, et, torch.tensor([timesteps[i + 1]]))
            x = (1 - m) * known + m * x
    return x.numpy()


def run_ours(sampler, config, steps, strength, z, eps, noise, mask=None, lcm_own=False, net=stand_in_unet):
    schedule = make_schedule(sampler, config, steps, strength, strength_in_schedule=lcm_own)
    pure = mask is not None and strength == 1.0
    x = initial(schedule, eps) if pure else initial(schedule, eps, z)
    after = keep_known(schedule, z, eps, mask) if mask is not None else None
    calls = []
    out = denoise(schedule, net, x, noise, callback=lambda i, n: calls.append((i, n)), after=after)
    assert calls == [(i, schedule.model_calls) for i in range(len(calls))] and calls
    return out


@pytest.mark.parametrize("strength", STRENGTHS)
@pytest.mark.parametrize("config", ["sd1", "sd2", "sd2_linspace"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_img2img_matches_diffusers(sampler, config, strength, injected_noise):
    z, eps, _ = draws(int(strength * 10))
    ours = run_ours(sampler, CONFIGS[config], 7, strength, z, eps, injected_noise())
    theirs = run_diffusers(sampler, CONFIGS[config], 7, strength, z, eps)
    assert np.abs(ours - theirs).max() <= TOL, np.abs(ours - theirs).max()


@pytest.mark.parametrize("strength", STRENGTHS)
@pytest.mark.parametrize("config", ["sd1", "sd2"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_four_channel_inpainting_matches_diffusers(sampler, config, strength, injected_noise):
    z, eps, mask = draws(3)
    ours = run_ours(sampler, CONFIGS[config], 6, strength, z, eps, injected_noise(), mask, net=spatial_unet)
    theirs = run_diffusers(sampler, CONFIGS[config], 6, strength, z, eps, mask, net=spatial_unet)
    assert np.abs(ours - theirs).max() <= TOL, np.abs(ours - theirs).max()
    np.testing.assert_array_equal(ours[:, :, 4:], z[:, :, 4:])  # the kept half ends as the init latents


@pytest.mark.parametrize(("steps", "strength"), [(4, 0.5), (4, 0.8), (2, 0.3), (8, 1.0)])
def test_lcm_own_img2img_narrows_its_grid(steps, strength, injected_noise):
    config = {"_class_name": "LCMScheduler", **{k: v for k, v in SD1.items() if k != "_class_name"}}
    z, eps, _ = draws(steps)
    ours = run_ours("lcm", config, steps, strength, z, eps, injected_noise(), lcm_own=True)
    theirs = run_diffusers("lcm", config, steps, strength, z, eps, lcm_own=True)
    assert np.abs(ours - theirs).max() <= TOL
    assert make_schedule("lcm", config, steps, strength, strength_in_schedule=True).model_calls == steps


def test_tolerance_separates_strengths_and_samplers(injected_noise):
    """The 1e-4 tolerance is far below what a neighbouring setting changes."""
    z, eps, _ = draws(6)
    base = run_ours("euler", SD1, 7, 0.6, z, eps, injected_noise())
    assert np.abs(base - run_diffusers("euler", SD1, 7, 0.3, z, eps)).max() > 100 * TOL
    assert np.abs(base - run_diffusers("heun", SD1, 7, 0.6, z, eps)).max() > 100 * TOL
    assert np.abs(base - run_ours("euler", SD1, 7, 0.6, z, eps * 0.99, injected_noise())).max() > 10 * TOL
    z, eps, mask = draws(3)  # the known region's noise level, one step off, shows in the repainted half
    inpainted = run_ours("dpmpp_2m", SD1, 6, 0.6, z, eps, injected_noise(), mask, net=spatial_unet)
    no_blend = run_ours("dpmpp_2m", SD1, 6, 0.6, z, eps, injected_noise(), net=spatial_unet)
    assert np.abs(inpainted[:, :, :4] - no_blend[:, :, :4]).max() > 100 * TOL


def test_first_step_follows_int_of_steps_times_strength():
    assert [first_step("euler", SD1, 10, s) for s in (1.0, 0.99, 0.5, 0.1)] == [0, 1, 5, 9]
    assert first_step("euler", SD1, 10, None) == 0
    with pytest.raises(BadInput, match="runs no step"):
        first_step("euler", SD1, 5, 0.1)
    with pytest.raises(BadInput, match="LCM schedule"):
        first_step("lcm", SD1, 8, 0.1, in_schedule=True)  # int(50 * 0.1) = 5 timesteps < 8 steps
    prk = {k: v for k, v in SD1.items() if k != "skip_prk_steps"}
    with pytest.raises(BadInput, match="Runge-Kutta"):
        first_step("pndm", prk, 8, 0.5)
    assert first_step("pndm", prk, 8, 1.0) == 0


def test_heun_and_pndm_count_their_calls_from_the_first_kept_step():
    for sampler, config in (("heun", SD1), ("pndm", SD1), ("lms", SD2)):
        cls, overrides = DIFFUSERS[sampler]
        theirs = cls.from_config(config, **overrides)
        theirs.set_timesteps(10)
        kept = len(theirs.timesteps[4 * theirs.order :])  # strength 0.6 of 10 steps: t_start = 4
        assert make_schedule(sampler, config, 10, 0.6).model_calls == kept, sampler
