"""`diffrt.Pipeline`: prompt -> tokenizer -> text encoder -> sampler loop over the UNet -> VAE -> upscaler.

Seeds: `np.random.default_rng(seed)` (PCG64) draws the initial noise first, as one standard-normal
float32 array of shape (num_images, C, H/8, W/8); stochastic samplers then draw their per-step noise from
the same generator, in step order. Same bundle, backend, seed and settings -> the same image.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diffrt.bundle import TOKENIZER, TOKENIZER_2, Manifest, load_manifest
from diffrt.engine.backends import Backend, Session, make_backend
from diffrt.engine.conditioning import (
    Prompts,
    Size,
    TextEncoder,
    guidance_embedding,
    per_image,
    text_conditioning,
    time_ids,
)
from diffrt.engine.images import to_hwc, to_pil
from diffrt.engine.samplers import default_sampler, resolve_sampler, run_sampler
from diffrt.engine.tokenizer import ClipTokenizer
from diffrt.errors import BadInput, NonFiniteOutput

log = logging.getLogger(__name__)


@dataclass
class PipelineOutput:
    images: list  # PIL images, or (H, W, 3) float32 arrays in [0, 1]
    timings: dict[str, float]  # seconds: tokenizer, text_encoder, denoise (loop), unet (all calls), vae_decoder,
    # upscaler, total
    unet_times: list[float] = field(default_factory=list)  # seconds per UNet call
    parameters: dict = field(default_factory=dict)  # the settings used, for PNG metadata and logs


class Pipeline:
    """Text-to-image from a bundle. Thread-safe: calls on one Pipeline run one at a time."""

    def __init__(self, bundle: Path, manifest: Manifest, backend: Backend):
        self.bundle, self.manifest, self.backend = bundle, manifest, backend
        self.tokenizer = ClipTokenizer(bundle / TOKENIZER, manifest.tokenizer)
        self.sessions: dict[str, Session] = {}
        for name, entry in manifest.components.items():
            path = bundle / entry.files.get(backend.precision, entry.files["fp32"])
            self.sessions[name] = backend.load(entry.spec, path)
        self.text_encoders = [TextEncoder(self.tokenizer, self.sessions["text_encoder"])]
        if manifest.tokenizer_2 is not None:  # SDXL
            tokenizer_2 = ClipTokenizer(bundle / TOKENIZER_2, manifest.tokenizer_2)
            self.text_encoders.append(TextEncoder(tokenizer_2, self.sessions["text_encoder_2"]))
        self.unet_inputs = {t.name: t for t in manifest.components["unet"].spec.inputs}
        self.default_sampler = default_sampler(manifest.scheduler)
        self._lock = threading.Lock()
        self._warned_no_upscaler = False

    @classmethod
    def load(cls, bundle: str | Path, backend: str = "auto", threads: int = 0) -> Pipeline:
        """Open a bundle directory (or "demo") on a backend: "tensorrt", "ort-cuda", "ort-cpu" or "auto"."""
        bundle = Path(bundle)
        manifest = load_manifest(bundle)
        return cls(bundle, manifest, make_backend(backend, manifest, threads, bundle))

    @property
    def has_upscaler(self) -> bool:
        return "upscaler" in self.sessions

    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | None = None,
        num_inference_steps: int = 30,
        guidance_scale: float = 7.5,
        scheduler: str | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images: int = 1,
        seed: int = 0,
        latents: np.ndarray | None = None,
        upscale: bool = True,
        output_type: str = "pil",
        callback: Callable[[int, int], None] | None = None,
        *,
        prompt_2: str | list[str] | None = None,
        negative_prompt_2: str | None = None,
        original_size: Size | None = None,
        target_size: Size | None = None,
        crops_coords_top_left: Size = (0, 0),
    ) -> PipelineOutput:
        """Generate images. `scheduler` None is the bundle's default: the distilled models' own (LCM, Turbo),
        else DPM++ 2M Karras. SDXL bundles also take diffusers' `prompt_2` / `negative_prompt_2` (default: the
        first prompts) and size conditions `original_size` / `target_size` (default (height, width)) and
        `crops_coords_top_left` (default (0, 0)); other bundles ignore them."""
        with self._lock:
            return self._generate(
                prompt,
                negative_prompt,
                num_inference_steps,
                guidance_scale,
                scheduler,
                height,
                width,
                num_images,
                seed,
                latents,
                upscale,
                output_type,
                callback,
                (prompt_2, negative_prompt_2, original_size, target_size, crops_coords_top_left),
            )

    def check_request(
        self,
        steps: int,
        guidance: float,
        height: int | None,
        width: int | None,
        num_images: int,
        latents: np.ndarray | None = None,
        output_type: str = "pil",
    ) -> tuple[int, int]:
        """Raise BadInput for settings this bundle cannot serve; return (height, width) with defaults filled.
        Cheap: services call it to refuse a request before queueing it."""
        m = self.manifest.model
        height = height or m.default_size
        width = width or m.default_size
        if not isinstance(steps, int) or steps < 1:
            raise BadInput(f"num_inference_steps must be an integer >= 1, got {steps!r}")
        if not math.isfinite(guidance):
            raise BadInput(f"guidance_scale must be a finite number, got {guidance!r}")
        if not isinstance(num_images, int) or num_images < 1:
            raise BadInput(f"num_images must be an integer >= 1, got {num_images!r}")
        vae_spec = self.manifest.components["vae_decoder"].spec
        max_images = vae_spec.dim_ranges["batch"].max
        if num_images > max_images:
            raise BadInput(
                f"num_images={num_images} is more than this bundle's {max_images} per call; "
                "make several calls or re-export"
            )
        f = m.vae_scale_factor
        unet_spec = self.manifest.components["unet"].spec
        mult = f * dict(unet_spec.multiples).get("latent_height", 1)
        lat = unet_spec.dim_ranges["latent_height"]
        for side, v in (("height", height), ("width", width)):  # checked in pixels, the user's unit
            if not isinstance(v, int) or v % f:
                raise BadInput(f"{side}={v} must be a multiple of {f}")
            if v % mult:
                raise BadInput(f"{side}={v} must be a multiple of {mult} for this checkpoint's UNet")
            if not lat.min * f <= v <= lat.max * f:
                raise BadInput(
                    f"{side}={v} is outside this bundle's range [{lat.min * f}, {lat.max * f}]; "
                    "choose a size in range or re-export with --image-range"
                )
        if latents is not None:
            want = (num_images, m.latent_channels, height // f, width // f)
            if not isinstance(latents, np.ndarray) or latents.shape != want or latents.dtype != np.float32:
                got = (latents.shape, latents.dtype) if isinstance(latents, np.ndarray) else type(latents)
                raise BadInput(f"latents must be a float32 array of shape {want}, got {got}")
        if output_type not in ("pil", "np"):
            raise BadInput(f"output_type must be 'pil' or 'np', got {output_type!r}")
        return height, width

    def _generate(
        self,
        prompt,
        negative_prompt,
        steps,
        guidance,
        scheduler,
        height,
        width,
        num_images,
        seed,
        latents,
        upscale,
        output_type,
        callback,
        xl,
    ) -> PipelineOutput:
        start = time.perf_counter()
        prompt_2, negative_prompt_2, original_size, target_size, crops = xl
        scheduler = resolve_sampler(scheduler or self.default_sampler)
        height, width = self.check_request(steps, guidance, height, width, num_images, latents, output_type)
        prompts = per_image(prompt, num_images, "prompt")
        prompts_2 = prompts if prompt_2 is None else per_image(prompt_2, num_images, "prompt_2")
        if upscale and not self.has_upscaler and not self._warned_no_upscaler:
            log.info("bundle has no upscaler: images stay at %dx%d", width, height)
            self._warned_no_upscaler = True
        timings: dict[str, float] = {}
        # at <= 1 the unconditional half changes nothing: skip it; LCM takes guidance as an input instead
        cfg = guidance > 1.0 and self.manifest.model.classifier_free_guidance

        conditions = text_conditioning(
            self.text_encoders,
            Prompts(prompts, prompts_2, negative_prompt, negative_prompt_2),
            cfg,
            self.manifest.model.force_zeros_for_empty_prompt,
            timings,
        )  # encoder_hidden_states (2B|B, 77, D) [, text_embeds (2B|B, P)]
        batch = conditions["encoder_hidden_states"].shape[0]
        if "time_ids" in self.unet_inputs:
            size = (height, width)
            conditions["time_ids"] = time_ids(original_size or size, crops, target_size or size, batch)
        if "timestep_cond" in self.unet_inputs:
            width_cond = self.unet_inputs["timestep_cond"].shape[1]
            conditions["timestep_cond"] = guidance_embedding(guidance, width_cond, batch)  # (2B|B, W)

        rng = np.random.default_rng(seed)
        f, c = self.manifest.model.vae_scale_factor, self.manifest.model.latent_channels
        if latents is None:
            latents = rng.standard_normal((num_images, c, height // f, width // f), dtype=np.float32)
        unet, unet_times = self.sessions["unet"], []

        def eps_fn(x_in: np.ndarray, t: float) -> np.ndarray:
            sample = np.concatenate([x_in, x_in]) if cfg else x_in  # (2B|B, C, h, w)
            t1 = time.perf_counter()
            out = unet.run({"sample": sample, "timestep": np.full((batch,), t, np.float32), **conditions})["noise_pred"]
            unet_times.append(time.perf_counter() - t1)
            if not cfg:
                return out
            uncond, cond = out[:num_images], out[num_images:]
            return uncond + guidance * (cond - uncond)

        def noise(shape: tuple[int, ...]) -> np.ndarray:
            return rng.standard_normal(shape, dtype=np.float32)

        t0 = time.perf_counter()
        latents = run_sampler(
            scheduler, eps_fn, latents, self.manifest.scheduler, steps, noise=noise, callback=callback
        )
        timings["denoise"] = time.perf_counter() - t0  # the whole loop: UNet calls + sampler/CFG host work
        timings["unet"] = sum(unet_times)
        if not np.isfinite(latents).all():
            raise NonFiniteOutput(
                "unet produced NaN/inf latents; with FP16 engines try the FP32 bundle or a "
                "lower guidance_scale, and report the checkpoint"
            )

        t0 = time.perf_counter()
        decoded = self.sessions["vae_decoder"].run({"latent": latents / self.manifest.model.scaling_factor})["image"]
        timings["vae_decoder"] = time.perf_counter() - t0
        if not np.isfinite(decoded).all():
            raise NonFiniteOutput(
                "vae_decoder produced NaN/inf pixels; FP16 VAE overflow — use the FP32 bundle "
                "(ort-cpu) or a VAE with FP32 islands"
            )
        images = np.clip(decoded / 2 + 0.5, 0.0, 1.0)  # (B, 3, H, W)

        upscaled = None
        if upscale and self.has_upscaler:
            from diffrt.engine.upscale import upscale_tiled

            info = self.manifest.upscaler
            session = self.sessions["upscaler"]
            t0 = time.perf_counter()
            images = upscale_tiled(
                lambda tile: session.run({"image": tile})["upscaled"],
                images,
                info.scale,
                tile=info.tile,
                overlap=info.overlap,
                size_multiple=info.size_multiple,
            )
            images = np.clip(images, 0.0, 1.0)
            timings["upscaler"] = time.perf_counter() - t0
            upscaled = f"{info.architecture} x{info.scale}"
        timings["total"] = time.perf_counter() - start

        out = to_hwc(images)
        if output_type == "pil":
            out = [to_pil(im) for im in out]
        parameters = {
            "prompt": prompts[0],
            "negative_prompt": negative_prompt,
            "num_inference_steps": steps,
            "guidance_scale": guidance,
            "scheduler": scheduler,
            "height": height,
            "width": width,
            "seed": seed,
            "num_images": num_images,
            "upscaled": upscaled,
            **({"prompt_2": prompts_2[0]} if len(self.text_encoders) > 1 else {}),
            "model_hash": self.manifest.source.get("sha256", ""),
        }
        return PipelineOutput(out, timings, unet_times, parameters)
