"""The demo checkpoint through diffusers' StableDiffusionPipeline (torch): the reference the runtime is held to.

Same prompt, sampler, steps, guidance and starting latents as a diffrt call, so their pictures and their prompt
accuracy can be compared.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# diffrt sampler name -> (diffusers scheduler class, config overrides)
DIFFUSERS_SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


def diffusers_generator(folder: Path, scheduler: str, steps: int, guidance: float):
    """A (prompt, latents) -> (H, W, 3) float image function running diffusers in FP32 on the CPU."""
    import diffusers
    import torch

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    cls_name, overrides = DIFFUSERS_SCHEDULERS[scheduler]
    pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **overrides)

    def generate(prompt: str, latents: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = pipe(
                prompt,
                num_inference_steps=steps,
                guidance_scale=guidance,
                latents=torch.from_numpy(latents),
                output_type="np",
            )
        return out.images[0]

    return generate


def diffrt_generator(bundle: Path, scheduler: str, steps: int, guidance: float, backend: str = "ort-cpu"):
    """The same function on a diffrt bundle (no upscaling: the suite reads 64x64 pictures)."""
    from diffrt import Pipeline

    pipe = Pipeline.load(bundle, backend=backend)

    def generate(prompt: str, latents: np.ndarray) -> np.ndarray:
        out = pipe(
            prompt,
            num_inference_steps=steps,
            guidance_scale=guidance,
            scheduler=scheduler,
            latents=latents,
            upscale=False,
            output_type="np",
        )
        return out.images[0]

    return generate
