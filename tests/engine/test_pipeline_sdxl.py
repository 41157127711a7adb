"""Full-pipeline parity from the same start with diffusers' StableDiffusionXLPipeline (SDXL, SDXL-Turbo),
StableDiffusionPipeline (SD-Turbo) and LatentConsistencyModelPipeline (LCM), on tiny bundles.

Tolerance: 1/255 per pixel (FP32 bundle on ONNX Runtime CPU against diffusers in torch FP32). Turbo is a
scheduler config on the SD 2.x / SDXL architecture: both sides run the same weights with the Turbo config.
"""

from dataclasses import replace

import numpy as np
import pytest
import torch

from diffrt import Pipeline
from diffrt.engine.backends import OrtCpuBackend
from tests.builders.sdxl import SD_TURBO_SCHEDULER, SDXL_TURBO_SCHEDULER

TOL = 1 / 255
PROMPT, PROMPT_2, NEGATIVE = "a cute red narwhal", "photo of the cat", "blue square"
DIFFUSERS = {
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}


@pytest.fixture(scope="module")
def xl(sdxl_bundle):
    return Pipeline.load(sdxl_bundle, backend="ort-cpu")


@pytest.fixture(scope="module")
def xl_reference(sdxl_folder):
    import diffusers

    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(sdxl_folder, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.original_scheduler_config = dict(pipe.scheduler.config)
    return pipe


def with_scheduler(pipe: Pipeline, config: dict) -> Pipeline:
    """The same bundle's graphs under another scheduler config, as a Turbo export of these weights would be."""
    return Pipeline(pipe.bundle, replace(pipe.manifest, scheduler=config), OrtCpuBackend())


def use_scheduler(reference, sampler: str, config: dict | None = None) -> None:
    import diffusers

    cls = getattr(diffusers, DIFFUSERS[sampler])
    reference.scheduler = cls.from_config(config or reference.original_scheduler_config)


def latents_for(seed: int, shape=(1, 4, 8, 8)) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def inject_noise(monkeypatch, seed: int) -> None:
    """diffusers draws step noise with torch; feed it the numpy stream diffrt draws from the same seed."""
    import diffusers.schedulers.scheduling_euler_ancestral_discrete as ea
    import diffusers.schedulers.scheduling_lcm as lcm

    stream = np.random.default_rng(seed)

    def injected(shape, generator=None, device=None, dtype=None, layout=None):
        return torch.from_numpy(stream.standard_normal(tuple(shape), dtype=np.float32))

    monkeypatch.setattr(ea, "randn_tensor", injected)
    monkeypatch.setattr(lcm, "randn_tensor", injected)


class UNetBatches:
    """A real UNet session that records the batch of every call."""

    def __init__(self, session):
        self.session, self.batches = session, []

    def run(self, feeds):
        self.batches.append(feeds["sample"].shape[0])
        return self.session.run(feeds)


def run_both(ours: Pipeline, reference, latents: np.ndarray, seed: int = 0, sampler=None, **kw) -> float:
    """Max abs pixel difference between diffrt and diffusers for the same request and start."""
    n, _, h, w = latents.shape
    common = dict(height=h * 8, width=w * 8, output_type="np", **kw)
    theirs = reference(num_images_per_prompt=n, latents=torch.from_numpy(latents.copy()), **common).images
    out = ours(num_images=n, latents=latents, seed=seed, scheduler=sampler, upscale=False, **common)
    mine = np.stack(out.images)
    assert mine.shape == np.asarray(theirs).shape
    err = float(np.abs(mine - np.asarray(theirs)).max())
    print(f"max abs error {err:.2e} ({err * 255:.3f} / 255)")  # shown with pytest -rA
    return err


@pytest.mark.parametrize("sampler", ["euler", "ddim", "dpmpp_2m", "unipc"])
def test_sdxl_parity_with_diffusers(sampler, xl, xl_reference):
    use_scheduler(xl_reference, sampler)
    err = run_both(
        xl,
        xl_reference,
        latents_for(7),
        sampler=sampler,
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=4,
        guidance_scale=5.0,
    )
    assert err <= TOL


def test_sdxl_second_prompts_size_conditions_and_zeroed_negative(xl, xl_reference):
    """prompt_2, non-default micro-conditioning, a non-square batch of 2, and no negative prompt: with
    force_zeros_for_empty_prompt the unconditional rows are zeros, not the encoded empty prompt."""
    use_scheduler(xl_reference, "euler")
    err = run_both(
        xl,
        xl_reference,
        latents_for(5, (2, 4, 8, 4)),
        sampler="euler",
        prompt=PROMPT,
        prompt_2=PROMPT_2,
        num_inference_steps=3,
        guidance_scale=6.0,
        original_size=(128, 96),
        target_size=(64, 32),
        crops_coords_top_left=(8, 0),
    )
    assert err <= TOL


def test_sdxl_negative_prompt_2(xl, xl_reference):
    use_scheduler(xl_reference, "dpmpp_2m")
    err = run_both(
        xl,
        xl_reference,
        latents_for(6),
        sampler="dpmpp_2m",
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        negative_prompt_2="green circle",
        num_inference_steps=3,
        guidance_scale=5.0,
    )
    assert err <= TOL


@pytest.mark.parametrize("steps", [1, 4])
def test_sdxl_turbo_parity_without_guidance(steps, xl, xl_reference, monkeypatch):
    """SDXL-Turbo: trailing-spaced ancestral Euler (the bundle's default sampler), guidance 0 (no CFG)."""
    turbo = with_scheduler(xl, SDXL_TURBO_SCHEDULER)
    assert turbo.default_sampler == "euler_a"
    use_scheduler(xl_reference, "euler_a", SDXL_TURBO_SCHEDULER)
    inject_noise(monkeypatch, seed=13)
    unet = turbo.sessions["unet"] = UNetBatches(turbo.sessions["unet"])
    err = run_both(
        turbo, xl_reference, latents_for(8), seed=13, prompt=PROMPT, num_inference_steps=steps, guidance_scale=0.0
    )
    assert err <= TOL
    assert unet.batches == [1] * steps  # no unconditional half


@pytest.fixture(scope="module")
def sd_turbo_reference(sd2_folder):
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(sd2_folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config({**SD_TURBO_SCHEDULER})
    return pipe


@pytest.mark.parametrize("steps", [1, 4])
def test_sd_turbo_parity_without_guidance(steps, sd2_bundle, sd_turbo_reference):
    """SD-Turbo: SD 2.x weights with trailing-spaced Euler (the bundle's default sampler), guidance 0."""
    turbo = with_scheduler(Pipeline.load(sd2_bundle, backend="ort-cpu"), SD_TURBO_SCHEDULER)
    assert turbo.default_sampler == "euler"
    err = run_both(
        turbo, sd_turbo_reference, latents_for(9), prompt=PROMPT, num_inference_steps=steps, guidance_scale=0.0
    )
    assert err <= TOL


@pytest.fixture(scope="module")
def lcm_reference(lcm_folder):
    import diffusers

    pipe = diffusers.LatentConsistencyModelPipeline.from_pretrained(lcm_folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("steps", [1, 4])
def test_lcm_parity_with_the_same_injected_noise(steps, lcm_bundle, lcm_reference, monkeypatch):
    """LCM: the guidance embedding as a UNet input (no CFG, one UNet row per image), the lcm sampler by
    default, and LCMScheduler's re-noising between steps fed the same draws."""
    ours = Pipeline.load(lcm_bundle, backend="ort-cpu")
    assert ours.default_sampler == "lcm"
    inject_noise(monkeypatch, seed=21)
    unet = ours.sessions["unet"] = UNetBatches(ours.sessions["unet"])
    err = run_both(
        ours, lcm_reference, latents_for(4), seed=21, prompt=PROMPT, num_inference_steps=steps, guidance_scale=8.5
    )
    assert err <= TOL
    assert unet.batches == [1] * steps
