"""Full-pipeline parity with diffusers' StableDiffusionPipeline from the same start, on tiny SD1/SD2 bundles.

Tolerance: 2/255 per pixel (FP32 bundle on ONNX Runtime CPU against diffusers in torch FP32).
"""

import numpy as np
import pytest
import torch

from diffrt import Pipeline

DETERMINISTIC = ["ddim", "pndm", "euler", "heun", "lms", "dpmpp_2m", "dpmpp_2m_karras", "unipc"]
STOCHASTIC = ["euler_a", "dpmpp_2m_sde_karras"]
DIFFUSERS = {  # sampler -> (diffusers class name, config overrides), as a user would switch schedulers
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpmpp_2m_sde_karras": (
        "DPMSolverMultistepScheduler",
        {"use_karras_sigmas": True, "algorithm_type": "sde-dpmsolver++"},
    ),
    "unipc": ("UniPCMultistepScheduler", {}),
}
TOL = 2 / 255
PROMPT, NEGATIVE = "a cute red narwhal", "blue square"


@pytest.fixture(scope="module")
def pipes(sd1_bundle, sd2_bundle):
    return {"sd1": Pipeline.load(sd1_bundle, backend="ort-cpu"), "sd2": Pipeline.load(sd2_bundle, backend="ort-cpu")}


@pytest.fixture(scope="module")
def reference(sd1_folder, sd2_folder):
    import diffusers

    out = {}
    for flavour, folder in (("sd1", sd1_folder), ("sd2", sd2_folder)):
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
        pipe.set_progress_bar_config(disable=True)
        pipe.original_scheduler_config = dict(pipe.scheduler.config)  # switch samplers from this, not the last
        out[flavour] = pipe
    return out


def run_diffusers(pipe, sampler, latents, steps=6, guidance=7.5, negative=NEGATIVE):
    import diffusers

    cls_name, overrides = DIFFUSERS[sampler]
    pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.original_scheduler_config, **overrides)
    n = latents.shape[0]
    result = pipe(
        PROMPT,
        negative_prompt=negative,
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=latents.shape[2] * 8,
        width=latents.shape[3] * 8,
        num_images_per_prompt=n,
        latents=torch.from_numpy(latents.copy()),
        output_type="np",
    )
    return np.asarray(result.images)


def run_diffrt(pipe, sampler, latents, steps=6, guidance=7.5, negative=NEGATIVE, seed=0):
    out = pipe(
        PROMPT,
        negative_prompt=negative,
        num_inference_steps=steps,
        guidance_scale=guidance,
        scheduler=sampler,
        height=latents.shape[2] * 8,
        width=latents.shape[3] * 8,
        num_images=latents.shape[0],
        latents=latents,
        seed=seed,
        upscale=False,
        output_type="np",
    )
    return np.stack(out.images)


@pytest.mark.parametrize("flavour", ["sd1", "sd2"])
@pytest.mark.parametrize("sampler", DETERMINISTIC)
def test_parity_with_diffusers(flavour, sampler, pipes, reference):
    latents = np.random.default_rng(7).standard_normal((1, 4, 8, 8), dtype=np.float32)
    ours = run_diffrt(pipes[flavour], sampler, latents)
    theirs = run_diffusers(reference[flavour], sampler, latents)
    assert ours.shape == theirs.shape == (1, 64, 64, 3)
    assert np.abs(ours - theirs).max() <= TOL


@pytest.mark.parametrize("sampler", STOCHASTIC)
def test_stochastic_samplers_match_with_the_same_injected_noise(sampler, pipes, reference, monkeypatch):
    """diffusers draws step noise with torch; feed it the numpy stream diffrt draws from the same seed."""
    import diffusers.schedulers.scheduling_dpmsolver_multistep as dpm
    import diffusers.schedulers.scheduling_euler_ancestral_discrete as ea

    seed = 11
    stream = np.random.default_rng(seed)

    def injected(shape, generator=None, device=None, dtype=None, layout=None):
        return torch.from_numpy(stream.standard_normal(tuple(shape), dtype=np.float32))

    monkeypatch.setattr(ea, "randn_tensor", injected)
    monkeypatch.setattr(dpm, "randn_tensor", injected)
    latents = np.random.default_rng(3).standard_normal((1, 4, 8, 8), dtype=np.float32)
    theirs = run_diffusers(reference["sd1"], sampler, latents)
    ours = run_diffrt(pipes["sd1"], sampler, latents, seed=seed)
    assert np.abs(ours - theirs).max() <= TOL


def test_parity_batched_non_square_without_negative(pipes, reference):
    latents = np.random.default_rng(5).standard_normal((2, 4, 8, 4), dtype=np.float32)
    ours = run_diffrt(pipes["sd1"], "euler", latents, negative=None)
    theirs = run_diffusers(reference["sd1"], "euler", latents, negative=None)
    assert ours.shape == (2, 64, 32, 3)
    assert np.abs(ours - theirs).max() <= TOL
    assert np.abs(ours[0] - ours[1]).max() > 0.01  # different starts, different images


def test_guidance_off_skips_the_unconditional_half(pipes, reference):
    latents = np.random.default_rng(9).standard_normal((1, 4, 8, 8), dtype=np.float32)
    ours = run_diffrt(pipes["sd1"], "dpmpp_2m", latents, guidance=1.0)
    theirs = run_diffusers(reference["sd1"], "dpmpp_2m", latents, guidance=1.0)
    assert np.abs(ours - theirs).max() <= TOL


def test_same_seed_same_image_different_seed_different_image(pipes):
    pipe = pipes["sd1"]
    a = pipe(PROMPT, num_inference_steps=4, scheduler="euler_a", seed=1, output_type="np").images[0]
    b = pipe(PROMPT, num_inference_steps=4, scheduler="euler_a", seed=1, output_type="np").images[0]
    c = pipe(PROMPT, num_inference_steps=4, scheduler="euler_a", seed=2, output_type="np").images[0]
    assert np.array_equal(a, b)
    assert np.abs(a - c).max() > 0.01


def test_timings_cover_every_stage(pipes):
    out = pipes["sd1"](PROMPT, num_inference_steps=3, scheduler="heun", output_type="pil")
    assert {"tokenizer", "text_encoder", "unet", "vae_decoder", "total"} <= set(out.timings)
    assert len(out.unet_times) == 5  # Heun: two model calls per step but the last
    assert out.images[0].size == (64, 64)
    assert out.timings["total"] >= out.timings["unet"] > 0
