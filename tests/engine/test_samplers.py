"""Sampler parity with diffusers' schedulers, driven exactly as StableDiffusionPipeline drives them.

Both sides run the same fixed stand-in network (nonlinear in x, dependent on t, float32) from the same unit
noise; stochastic samplers get the same injected noise. Tolerance: max |ours - diffusers| <= 1e-4 on the final
latents. diffusers and torch are test-only imports here.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import inspect  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers.schedulers import (  # noqa: E402
    scheduling_ddim,
    scheduling_dpmsolver_multistep,
    scheduling_euler_ancestral_discrete,
    scheduling_euler_discrete,
    scheduling_heun_discrete,
    scheduling_lcm,
    scheduling_lms_discrete,
    scheduling_pndm,
    scheduling_unipc_multistep,
)

from diffrt.bundle import SD_SCHEDULER
from diffrt.engine.samplers import SAMPLERS, resolve_sampler, run_sampler  # noqa: E402
from diffrt.engine.schedules import make_schedule  # noqa: E402
from diffrt.errors import BadInput  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),  # diffusers on numpy 2
    pytest.mark.usefixtures("injected_noise"),  # tests/engine/conftest.py
]
TOL = 1e-4  # max abs difference of the final latents, float32 on both sides
DIFFUSERS = {  # sampler -> (diffusers class, from_config overrides the name implies)
    "ddim": (scheduling_ddim.DDIMScheduler, {}),
    "pndm": (scheduling_pndm.PNDMScheduler, {}),
    "euler": (scheduling_euler_discrete.EulerDiscreteScheduler, {}),
    "euler_a": (scheduling_euler_ancestral_discrete.EulerAncestralDiscreteScheduler, {}),
    "heun": (scheduling_heun_discrete.HeunDiscreteScheduler, {}),
    "lms": (scheduling_lms_discrete.LMSDiscreteScheduler, {}),
    "dpmpp_2m": (scheduling_dpmsolver_multistep.DPMSolverMultistepScheduler, {}),
    "dpmpp_2m_karras": (scheduling_dpmsolver_multistep.DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "dpmpp_2m_sde_karras": (
        scheduling_dpmsolver_multistep.DPMSolverMultistepScheduler,
        {"use_karras_sigmas": True, "algorithm_type": "sde-dpmsolver++"},
    ),
    "unipc": (scheduling_unipc_multistep.UniPCMultistepScheduler, {}),
    "lcm": (scheduling_lcm.LCMScheduler, {}),
}
_SD = {k: v for k, v in SD_SCHEDULER.items() if k not in ("_class_name", "skip_prk_steps", "prediction_type")}
SD1 = {"_class_name": "PNDMScheduler", "skip_prk_steps": True, "prediction_type": "epsilon", **_SD}
SD2 = {"_class_name": "DDIMScheduler", "prediction_type": "v_prediction", "skip_prk_steps": True, **_SD}
CONFIGS = {
    "sd1": SD1,
    "sd2": SD2,
    "sd1_trailing": {**SD1, "timestep_spacing": "trailing"},
    "sd2_linspace": {**SD2, "timestep_spacing": "linspace"},
}
EULER_STYLE = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "timestep_spacing": "trailing",
}  # no clip_sample: DDIM clips
COSINE = {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction", "steps_offset": 1}
LINEAR = {"beta_schedule": "linear", "timestep_spacing": "leading", "steps_offset": 1}  # DDPM's betas
ZERO_SNR = {**SD2, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
EXTRA = [  # (sampler, config, steps): options the SD configs leave at their defaults
    *[(s, {**SD1, "use_karras_sigmas": True}, 8) for s in ("euler", "heun", "lms", "unipc", "dpmpp_2m")],
    ("pndm", {k: v for k, v in SD1.items() if k != "skip_prk_steps"}, 8),  # pseudo Runge-Kutta warm-up
    ("pndm", {**SD2, "skip_prk_steps": False, "timestep_spacing": "trailing"}, 9),
    ("ddim", EULER_STYLE, 7),
    ("ddim", {**SD2, "set_alpha_to_one": True, "clip_sample": True, "clip_sample_range": 0.5}, 6),
    ("euler", {**SD1, "final_sigmas_type": "sigma_min"}, 6),
    ("heun", {**SD2, "clip_sample": True}, 5),
    ("dpmpp_2m", {**SD2, "final_sigmas_type": "sigma_min", "solver_type": "heun"}, 16),
    ("dpmpp_2m_sde_karras", {**SD1, "solver_type": "heun"}, 16),
    ("dpmpp_2m", {**SD1, "lambda_min_clipped": -3.0, "euler_at_final": True}, 20),
    ("unipc", {**SD2, "solver_order": 3, "solver_type": "bh1", "final_sigmas_type": "sigma_min"}, 16),
    (
        "unipc",
        {
            **SD1,
            "solver_order": 3,
            "disable_corrector": [0, 3],
            "lower_order_final": False,
            "final_sigmas_type": "sigma_min",
        },
        12,
    ),
    ("unipc", {**SD2, "use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}, 10),
    ("lcm", {**SD2, "clip_sample": True}, 4),
    ("lcm", {"_class_name": "LCMScheduler", "original_inference_steps": 25, "timestep_scaling": 5.0}, 8),
    # cosine betas reach sigma = 2e4: fine in VP space, float32-ill-conditioned for the VE samplers' first step
    *[(s, COSINE, 9) for s in ("ddim", "pndm", "dpmpp_2m", "unipc", "lcm")],
    *[(s, LINEAR, 9) for s in ("euler", "euler_a", "heun", "lms", "dpmpp_2m_sde_karras")],
    *[(s, ZERO_SNR, 8) for s in ("ddim", "euler", "euler_a", "dpmpp_2m", "unipc", "lcm")],
]


_SD_ALPHA_BAR = np.cumprod(1.0 - np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2)


def stand_in_unet(x: np.ndarray, t: float) -> np.ndarray:
    """Deterministic stand-in for the UNet: nonlinear, mixes channels, depends on t.

    Shaped like a denoiser of SD's schedule (mostly noise at high t) so the final latents stay O(1) and an
    absolute tolerance means the same thing for every sampler.
    """
    a = float(np.interp(t, np.arange(1000), _SD_ALPHA_BAR))
    mix = np.float32(0.2 + 0.1 * np.sin(t / 90.0))
    structure = np.tanh(x * np.float32(0.6 + 0.3 * np.cos(t / 170.0)) + mix * np.roll(x, 1, axis=1))
    return (x * np.float32((1.0 - a) ** 0.5) + structure * np.float32(0.5 * a**0.5)).astype(np.float32)


def run_diffusers(sampler, config, steps, latents):
    """StableDiffusionPipeline's denoising loop around the stand-in network."""
    cls, overrides = DIFFUSERS[sampler]
    scheduler = cls.from_config(dict(config), **overrides)
    scheduler.set_timesteps(steps)
    x = torch.from_numpy(latents.copy()) * scheduler.init_noise_sigma
    extra = {"eta": 0.0} if "eta" in inspect.signature(scheduler.step).parameters else {}
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        out = torch.from_numpy(stand_in_unet(x_in.numpy(), float(t)))
        x = scheduler.step(out, t, x, **extra, return_dict=False)[0]
    return x.numpy()


def check_parity(sampler, config, steps, noise):
    latents = np.random.default_rng(steps).standard_normal((2, 4, 8, 8), dtype=np.float32)
    calls = []
    ours = run_sampler(
        sampler, stand_in_unet, latents, config, steps, noise=noise(), callback=lambda i, n: calls.append((i, n))
    )
    theirs = run_diffusers(sampler, config, steps, latents)
    assert ours.dtype == np.float32 and ours.shape == latents.shape
    assert np.isfinite(theirs).all()
    assert np.abs(ours - theirs).max() <= TOL, np.abs(ours - theirs).max()
    assert calls == [(i, len(calls)) for i in range(len(calls))] and calls  # one call per network evaluation


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_parity_with_diffusers(sampler, config, injected_noise):
    check_parity(sampler, CONFIGS[config], 7, injected_noise)


@pytest.mark.parametrize(("sampler", "config", "steps"), EXTRA, ids=[f"{s}-{i}" for i, (s, _, _) in enumerate(EXTRA)])
def test_parity_with_diffusers_config_options(sampler, config, steps, injected_noise):
    check_parity(sampler, config, steps, injected_noise)


@pytest.mark.parametrize("steps", [1, 2, 3, 25])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_parity_at_few_and_many_steps(sampler, steps, injected_noise):
    check_parity(sampler, SD1 if steps % 2 else SD2, steps, injected_noise)


def test_model_calls_match_diffusers():
    for sampler in SAMPLERS:
        cls, overrides = DIFFUSERS[sampler]
        theirs = cls.from_config(SD1, **overrides)
        theirs.set_timesteps(10)
        assert make_schedule(sampler, SD1, 10).model_calls == len(theirs.timesteps), sampler


def test_spacing_default_follows_the_sampler_class_as_from_config_does():
    assert make_schedule("euler", SD1, 10).timesteps[0] == 999  # Euler's default: linspace
    assert make_schedule("ddim", SD1, 10).timesteps[0] == 901  # DDIM's default: leading, steps_offset 1
    loaded = {**SD1, "timestep_spacing": "leading", "_use_default_values": ["timestep_spacing"]}
    assert make_schedule("euler", loaded, 10).timesteps[0] == 999


@pytest.mark.parametrize(
    ("name", "short"),
    [
        ("euler_a", "euler_a"),
        ("EULER A", "euler_a"),
        ("Euler a", "euler_a"),
        ("PLMS", "pndm"),
        ("DPMSolverMultistepScheduler", "dpmpp_2m"),
        ("dpm++ 2m karras", "dpmpp_2m_karras"),
        ("DPM++ 2M SDE Karras", "dpmpp_2m_sde_karras"),
        ("UniPCMultistepScheduler", "unipc"),
        ("LCMScheduler", "lcm"),
        ("lmsdiscretescheduler", "lms"),
        (" heun ", "heun"),
        ("DDIM", "ddim"),
        ("EulerDiscreteScheduler", "euler"),
        ("EulerAncestralDiscreteScheduler", "euler_a"),
        ("PNDMScheduler", "pndm"),
        ("HeunDiscreteScheduler", "heun"),
    ],
)
def test_resolve_sampler_aliases(name, short):
    assert resolve_sampler(name) == short


def test_unknown_sampler_lists_the_names():
    with pytest.raises(BadInput) as err:
        resolve_sampler("warp_drive")
    msg = str(err.value)
    assert "\n" not in msg and "unknown" in msg and "warp_drive" in msg
    assert all(name in msg for name in SAMPLERS)


def test_unsupported_config_option_is_bad_input():
    with pytest.raises(BadInput, match="thresholding"):
        make_schedule("ddim", {**SD2, "thresholding": True}, 10)
    make_schedule("euler", {**SD2, "thresholding": True}, 10)  # Euler has no such option: ignored, as in diffusers


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m_sde_karras", "lcm"])
def test_stochastic_samplers_are_deterministic_per_seed(sampler):
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8), dtype=np.float32)

    def run(seed):
        rng = np.random.default_rng(seed)
        noise = lambda shape: rng.standard_normal(shape, dtype=np.float32)  # noqa: E731
        return run_sampler(sampler, stand_in_unet, latents, SD1, 6, noise=noise)

    a, b, c = run(1), run(1), run(2)
    assert np.array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3
    with pytest.raises(BadInput, match="noise"):
        run_sampler(sampler, stand_in_unet, latents, SD1, 6)
