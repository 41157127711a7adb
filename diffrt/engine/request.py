"""One generation request: every setting of one call, built once at the edge (Python keywords, CLI flags, HTTP
JSON) and read everywhere after. `resolve(manifest)` fills the bundle's defaults and validates against its
specs; every default a request can take is written here, once.

Jobs: text to image, optionally with a second hires pass (`hires`, A1111's hires fix); image to image
(`image`, `strength`); inpainting (`image`, `mask_image`, white = repaint). Names and defaults are diffusers'
where diffusers has them, A1111's where only A1111 has them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from diffrt.bundle import Manifest
from diffrt.engine.hires import HiresOptions, target_side
from diffrt.engine.images import ImageLike, decode_image, init_image_array, mask_array, target_size
from diffrt.engine.prompts import SYNTAXES
from diffrt.engine.samplers import default_sampler, resolve_sampler
from diffrt.engine.schedules import first_step
from diffrt.errors import BadInput

log = logging.getLogger(__name__)

Size = tuple[int, int]  # (height, width) or (top, left), in pixels
DEFAULT_STEPS = 30  # a bundle's manifest `defaults` may set its own (the demo does)
DEFAULT_GUIDANCE = 7.5
REFINER_AT = 0.8  # where the SDXL refiner takes over when one is loaded (diffusers' docs' denoising_end)


def default_strength(family: str, inpainting: bool) -> float:
    """diffusers' pipeline defaults: SD img2img 0.8 (LCM's too), SDXL img2img 0.3; inpainting 1.0, SDXL 0.9999."""
    if inpainting:
        return 0.9999 if family == "sdxl" else 1.0
    return 0.3 if family == "sdxl" else 0.8


@dataclass(frozen=True, eq=False)  # arrays and images inside: identity equality
class Request:
    """Everything one generation needs. None means "the bundle's default", filled by `resolve`."""

    prompt: str | Sequence[str]  # one for all images, or one per image
    negative_prompt: str | None = None  # None: the empty prompt (SDXL: zeros, as diffusers)
    prompt_syntax: str = "a1111"  # A1111's (weights) and BREAK in prompts (diffrt.engine.prompts); "plain": off
    clip_skip: int | None = None  # A1111's "Clip skip": 1 the usual layer, 2 the one before (diffusers' clip_skip=1)
    num_inference_steps: int | None = None  # None: the bundle's default (30 unless its manifest says otherwise)
    guidance_scale: float | None = None  # <= 1 turns classifier-free guidance off; None: the bundle's (7.5)
    scheduler: str | None = None  # short, diffusers class or A1111 name; None: the bundle's default sampler
    height: int | None = None  # None: the native size; image to image: the init image's own size
    width: int | None = None
    num_images: int = 1
    seed: int | Sequence[int] = 0  # one seed: image i draws from seed + i; or one seed per image
    latents: np.ndarray | None = None  # (num_images, C, H/8, W/8) float32: replaces the initial noise draw
    upscale: bool = True  # no-op when the bundle has no upscaler
    output_type: Literal["pil", "np"] = "pil"
    # SDXL (ignored by other bundles): diffusers' names and defaults
    prompt_2: str | Sequence[str] | None = None  # None: the prompt
    negative_prompt_2: str | None = None  # None: the negative prompt
    original_size: Size | None = None  # None: (height, width)
    target_size: Size | None = None  # None: (height, width)
    crops_coords_top_left: Size = (0, 0)
    aesthetic_score: float = 6.0  # UNets with aesthetic-score time ids (the SDXL refiner) only
    negative_aesthetic_score: float = 2.5
    # image to image and inpainting
    image: ImageLike | None = None  # PIL image, (H, W, 3) array (uint8, or float in [0, 1]), path or bytes
    strength: float | None = None  # share of the schedule to run, (0, 1]; None: default_strength()
    mask_image: ImageLike | None = None  # white = repaint; resized to the image size as diffusers does
    paste_back: bool = False  # paste the unmasked original back through the mask blurred by mask_blur (A1111)
    mask_blur: int = 4  # pixels of Gaussian blur on the paste-back mask
    # text to image: a second pass at a larger size (A1111's hires fix); None: one pass
    hires: HiresOptions | None = None
    # SDXL base -> refiner (a Pipeline loaded with refiner=): the share of the schedule the base runs
    refiner_at: float | None = None  # None: REFINER_AT when a refiner is loaded
    # LoRAs merged for this call: (file, scale) pairs, e.g. [("style.safetensors", 0.8)]; a name is looked up
    # in the pipeline's LoRA folder; with prompt_syntax "a1111" the prompt's <lora:NAME:SCALE> tags join them
    loras: Sequence[tuple[str | Path, float]] = ()
    # set by resolve(): the decoded images and the sha256 of the init image (file bytes, else pixels)
    image_sha256: str | None = field(default=None, repr=False)
    resolved: bool = field(default=False, repr=False)

    @property
    def prompts(self) -> tuple[str, ...]:
        return tuple(self.prompt)  # resolved: one per image

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(self.seed)  # resolved: one per image

    @property
    def is_image_job(self) -> bool:
        return self.image is not None

    @property
    def is_inpainting(self) -> bool:
        return self.mask_image is not None

    def resolve(self, manifest: Manifest) -> Request:
        """A copy with every default filled and every field checked against the bundle: per-image prompts and
        seeds, the short sampler name, the size, the strength, and the images decoded to model arrays (init
        image (1, 3, H, W) in [-1, 1], mask (1, 1, H, W) in {0, 1}). Raises BadInput naming the field."""
        if self.resolved:
            return self
        m, specs = manifest.model, manifest.components
        defaults = bundle_defaults(manifest)
        steps = _int(self.num_inference_steps, "num_inference_steps", 1, default=defaults["num_inference_steps"])
        guidance = self.guidance_scale if self.guidance_scale is not None else defaults["guidance_scale"]
        if isinstance(guidance, bool) or not isinstance(guidance, int | float) or not math.isfinite(guidance):
            raise BadInput(f"guidance_scale must be a finite number, got {guidance!r}", "guidance_scale")
        scheduler = self.scheduler or defaults["scheduler"]
        try:
            scheduler = resolve_sampler(scheduler)
        except BadInput as e:
            raise BadInput(str(e), "scheduler") from None
        n = _int(self.num_images, "num_images", 1)
        max_images = specs["vae_decoder"].spec.dim_ranges["batch"].max
        if n > max_images:
            raise BadInput(
                f"num_images={n} is more than this bundle's {max_images} per call; make several calls or re-export",
                "num_images",
            )
        prompts = _per_image(self.prompt, n, "prompt")
        prompts_2 = prompts if self.prompt_2 is None else _per_image(self.prompt_2, n, "prompt_2")
        for name in ("negative_prompt", "negative_prompt_2"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise BadInput(f"{name} must be a string or None", name)
        seeds = _seeds(self.seed, n)
        if self.output_type not in ("pil", "np"):
            raise BadInput(f"output_type must be 'pil' or 'np', got {self.output_type!r}", "output_type")

        inpainting_unet = manifest.inpainting_unet
        if self.mask_image is not None and self.image is None:
            raise BadInput("mask_image needs image: pass the picture to inpaint as image", "mask_image")
        if inpainting_unet and self.mask_image is None:
            raise BadInput(
                "this bundle's UNet is an inpainting UNet (latents + mask + masked image): pass image and mask_image",
                "mask_image",
            )
        if self.image is None and self.strength is not None:
            raise BadInput("strength applies to image jobs: pass image (and mask_image to inpaint)", "strength")
        if self.image is not None and "vae_encoder" not in specs:
            raise BadInput(
                "this bundle has no VAE encoder, which image jobs need (it was exported by an older diffrt); "
                "re-export it with `diffrt export`",
                "image",
            )
        if self.prompt_syntax not in SYNTAXES:
            raise BadInput(
                f"prompt_syntax must be one of {', '.join(SYNTAXES)}, got {self.prompt_syntax!r}", "prompt_syntax"
            )
        clip_skip = _int(self.clip_skip, "clip_skip", 1, default=defaults["clip_skip"])
        if clip_skip > max_clip_skip(manifest):
            most = max_clip_skip(manifest)
            fix = "it was exported before clip skip: re-export it" if most == 1 else f"use 1 to {most}"
            raise BadInput(f"clip_skip={clip_skip} is more than this bundle's text encoders take; {fix}", "clip_skip")
        if self.paste_back and self.mask_image is None:
            raise BadInput("paste_back applies to inpainting: pass mask_image", "paste_back")
        blur = _int(self.mask_blur, "mask_blur", 0)

        image = mask = sha = None
        strength = None
        height, width = self.height, self.width
        if self.image is not None:
            picture, sha = decode_image(self.image, "image")
            if self.mask_image is None:  # image to image keeps the image's own size, down to a multiple of f
                height, width = target_size(picture, height, width, m.vae_scale_factor)
            strength = self.strength
            if strength is None:
                strength = default_strength(m.family, self.mask_image is not None)
            if isinstance(strength, bool) or not isinstance(strength, int | float) or not 0 < strength <= 1:
                raise BadInput(f"strength must be a number in (0, 1], got {strength!r}", "strength")
            strength = float(strength)
        height = _int(height, "height", 1, default=m.default_size)
        width = _int(width, "width", 1, default=m.default_size)
        check_size(manifest, height, width)
        if self.image is not None:
            image = init_image_array(picture, height, width)
            if self.mask_image is not None:
                mask = mask_array(decode_image(self.mask_image, "mask_image")[0], height, width)
            try:  # a strength that leaves no step is refused here, before any work
                first_step(scheduler, manifest.scheduler, steps, strength, strength_in_schedule(manifest))
            except BadInput as e:
                raise BadInput(str(e), "strength") from None
        if self.latents is not None:
            want = (n, m.latent_channels, height // m.vae_scale_factor, width // m.vae_scale_factor)
            lat = self.latents
            if not isinstance(lat, np.ndarray) or lat.shape != want or lat.dtype != np.float32:
                got = (lat.shape, lat.dtype) if isinstance(lat, np.ndarray) else type(lat)
                raise BadInput(f"latents must be a float32 array of shape {want}, got {got}", "latents")
        hires = self.hires
        if hires is not None:
            if not isinstance(hires, HiresOptions):
                raise BadInput(f"hires must be a HiresOptions or None, got {type(hires).__name__}", "hires")
            if self.image is not None:
                raise BadInput("hires applies to text to image; for an image job raise strength or the size", "hires")
            hires = hires.resolved("upscaler" in manifest.components)
            big = hires_size(manifest, height, width, hires.scale)
            lo, hi = size_range(manifest)
            if not all(lo <= v <= hi for v in big):
                raise BadInput(
                    f"hires target {big[1]}x{big[0]} ({hires.scale:g} x {width}x{height}) is outside this bundle's "
                    f"range [{lo}, {hi}]; lower hires.scale or re-export with a larger --image-range",
                    "hires",
                )
            try:
                first_step(scheduler, manifest.scheduler, hires.steps or steps, hires.strength,
                           strength_in_schedule(manifest))  # fmt: skip
            except BadInput as e:
                raise BadInput(f"hires: {e}", "hires") from None
        at = self.refiner_at
        if at is not None and (isinstance(at, bool) or not isinstance(at, int | float) or not 0 < at < 1):
            raise BadInput(f"refiner_at must be a number in (0, 1), got {at!r}", "refiner_at")
        sizes = {}
        for name in ("original_size", "target_size", "crops_coords_top_left"):
            value = getattr(self, name)
            if value is not None:
                pair = tuple(value) if isinstance(value, Sequence) and not isinstance(value, str) else ()
                ints = all(isinstance(v, int | np.integer) and not isinstance(v, bool) and v >= 0 for v in pair)
                if len(pair) != 2 or not ints:
                    raise BadInput(f"{name} must be a pair of non-negative integers, got {value!r}"[:200], name)
                value = tuple(int(v) for v in pair)
            sizes[name] = value
        for name in ("aesthetic_score", "negative_aesthetic_score"):
            if not isinstance(getattr(self, name), int | float) or not math.isfinite(getattr(self, name)):
                raise BadInput(f"{name} must be a finite number", name)
        tags: list[tuple[str, float]] = []
        negatives = {name: getattr(self, name) for name in ("negative_prompt", "negative_prompt_2")}
        if self.prompt_syntax == "a1111":  # A1111's extra networks: the LoRA tags leave the text
            prompts, tags = _take_lora_tags(prompts, "prompt")
            prompts_2, tags_2 = _take_lora_tags(prompts_2, "prompt_2")
            tags += [t for t in tags_2 if t not in tags]
            for name, text in negatives.items():
                if text is not None:
                    negatives[name], dropped = _take_lora_tags((text,), name)
                    negatives[name] = negatives[name][0]
                    if dropped:
                        log.warning("%s: <lora:...> tags apply in the prompt; ignored in the negative prompt", name)
        loras = check_loras(self.loras, tags)
        return replace(
            self,
            prompt=prompts,
            **negatives,
            prompt_2=prompts_2,
            num_inference_steps=steps,
            guidance_scale=float(guidance),
            scheduler=scheduler,
            height=height,
            width=width,
            num_images=n,
            seed=seeds,
            image=image,
            mask_image=mask,
            strength=strength,
            mask_blur=blur,
            clip_skip=clip_skip,
            hires=hires,
            loras=loras,
            image_sha256=sha,
            **sizes,
            resolved=True,
        )

    def parameters(self) -> dict[str, Any]:
        """The settings of a resolved request, for PNG metadata, logs and answers (JSON-ready, no arrays)."""
        out = {
            "prompt": self.prompts[0],
            "negative_prompt": self.negative_prompt,
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "scheduler": self.scheduler,
            "height": self.height,
            "width": self.width,
            "seed": self.seeds[0],
            "all_seeds": list(self.seeds),
            "num_images": self.num_images,
        }
        if self.image is not None:
            out.update(strength=self.strength, init_image_sha256=self.image_sha256)
            out["job"] = "inpaint" if self.mask_image is not None else "img2img"
            if self.paste_back:
                out["mask_blur"] = self.mask_blur
        if self.prompt_syntax != "a1111":
            out["prompt_syntax"] = self.prompt_syntax
        if self.clip_skip != 1:
            out["clip_skip"] = self.clip_skip
        if self.refiner_at is not None:
            out["refiner_at"] = self.refiner_at
        if self.hires is not None:
            h = self.hires
            out.update(hires_scale=h.scale, hires_upscaler=h.upscaler, hires_steps=h.steps, hires_strength=h.strength)
        return out


def bundle_defaults(manifest: Manifest) -> dict[str, Any]:
    """num_inference_steps, guidance_scale, clip_skip and scheduler when a request leaves them out: the manifest's
    own `defaults` over diffrt's; the sampler of the checkpoint's scheduler for distilled models (default_sampler)."""
    out = {"num_inference_steps": DEFAULT_STEPS, "guidance_scale": DEFAULT_GUIDANCE, "clip_skip": 1}
    out.update(manifest.defaults)
    out.setdefault("scheduler", default_sampler(manifest.scheduler))
    return out


def clip_skips(manifest: Manifest, encoder: str) -> int:
    """The clip skip values 1 .. N a text encoder's graph takes (its `clip_skip` input); 0: it has no such input."""
    inputs = {t.name: t for t in manifest.components[encoder].spec.inputs}
    return inputs["clip_skip"].high if "clip_skip" in inputs else 0


def max_clip_skip(manifest: Manifest) -> int:
    """The largest clip skip every text encoder of the bundle takes (1: the usual layer only)."""
    return min(clip_skips(manifest, e) or 1 for e in ("text_encoder", "text_encoder_2") if e in manifest.components)


def strength_in_schedule(manifest: Manifest) -> bool:
    """LCM-distilled bundles take image-to-image strength into the LCM schedule itself, as diffusers'
    LatentConsistencyModelImg2ImgPipeline does; every other bundle runs the tail of the full schedule."""
    return not manifest.model.classifier_free_guidance


def size_range(manifest: Manifest) -> tuple[int, int]:
    """The image sides in pixels the bundle's UNet takes, (min, max)."""
    lat = manifest.components["unet"].spec.dim_ranges["latent_height"]
    return lat.min * manifest.model.vae_scale_factor, lat.max * manifest.model.vae_scale_factor


def size_multiple(manifest: Manifest) -> int:
    """What every image side must be a multiple of, in pixels: the VAE factor times the UNet's latent multiple."""
    unet = manifest.components["unet"].spec
    return manifest.model.vae_scale_factor * dict(unet.multiples).get("latent_height", 1)


def check_size(manifest: Manifest, height: int, width: int) -> None:
    """Image sides in pixels, the user's unit: multiples of the VAE factor and of the UNet's, inside the range."""
    f = manifest.model.vae_scale_factor
    mult = size_multiple(manifest)
    lo, hi = size_range(manifest)
    for side, v in (("height", height), ("width", width)):
        if v % f:
            raise BadInput(f"{side}={v} must be a multiple of {f}", side)
        if v % mult:
            raise BadInput(f"{side}={v} must be a multiple of {mult} for this checkpoint's UNet", side)
        if not lo <= v <= hi:
            raise BadInput(
                f"{side}={v} is outside this bundle's range [{lo}, {hi}]; "
                "choose a size in range (--size) or re-export with --image-range",
                side,
            )


def hires_size(manifest: Manifest, height: int, width: int, scale: float) -> tuple[int, int]:
    """(height, width) of the hires pass: A1111's int(side x scale), down to the UNet's size multiple."""
    mult = size_multiple(manifest)
    return target_side(height, scale, mult), target_side(width, scale, mult)


def batch_key(r: Request) -> tuple | None:
    """Resolved requests with equal keys can share one pipeline call (images and seeds stay each request's own);
    None: the request runs alone (image jobs, given latents)."""
    if r.image is not None or r.latents is not None:
        return None
    skip = {"prompt", "prompt_2", "seed", "num_images", "image_sha256", "resolved"}
    return tuple(getattr(r, f.name) for f in fields(Request) if f.name not in skip)


def combine(requests: Sequence[Request]) -> Request:
    """One resolved request for several with the same batch_key: prompts and seeds side by side."""
    if len(requests) == 1:
        return requests[0]
    keys = {batch_key(r) for r in requests}
    if len(keys) != 1 or None in keys:
        raise ValueError("combine() takes resolved requests with one batch_key")
    return replace(
        requests[0],
        prompt=tuple(p for r in requests for p in r.prompts),
        prompt_2=tuple(p for r in requests for p in r.prompt_2),
        seed=tuple(s for r in requests for s in r.seeds),
        num_images=sum(r.num_images for r in requests),
    )


def check_loras(loras, tags: Sequence[tuple[str, float]] = ()) -> tuple[tuple[str | Path, float], ...]:
    """(file or name, scale) pairs, the given ones then the prompt's tags, scales checked; the pipeline finds
    the files (in its LoRA folder for names)."""
    from diffrt.engine.lora import check_scale

    try:
        pairs = [(f if isinstance(f, str | Path) else Path(f), s) for f, s in loras]
    except (TypeError, ValueError):
        raise BadInput(f"loras must be (file, scale) pairs, got {loras!r}"[:200], "loras") from None
    try:
        return tuple((f, check_scale(s, Path(f).name)) for f, s in [*pairs, *tags])
    except BadInput as e:
        raise BadInput(str(e), "loras") from None


def _take_lora_tags(prompts: tuple[str, ...], field: str) -> tuple[tuple[str, ...], list[tuple[str, float]]]:
    """The prompts without A1111's <lora:NAME:SCALE> tags, and the tags: one LoRA set for all images of a call."""
    from diffrt.engine.lora import lora_tags

    try:
        taken = [lora_tags(p) for p in prompts]
    except BadInput as e:
        raise BadInput(str(e), field) from None
    if len({tuple(tags) for _, tags in taken}) > 1:
        raise BadInput("the prompts of one call name different <lora:...> tags; make one call per LoRA set", field)
    return tuple(text for text, _ in taken), (taken[0][1] if taken else [])


def _int(value: Any, name: str, low: int, default: int | None = None) -> int:
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise BadInput(f"{name} must be an integer >= {low}, got {value!r}", name)
    return int(value)


def _per_image(prompt: Any, n: int, name: str) -> tuple[str, ...]:
    prompts = (prompt,) * n if isinstance(prompt, str) else tuple(prompt) if isinstance(prompt, Sequence) else None
    if prompts is None or not all(isinstance(p, str) for p in prompts):
        raise BadInput(f"{name} must be a string or a list of strings", name)
    if len(prompts) != n:
        raise BadInput(f"got {len(prompts)} {name}s for num_images={n}; pass one {name} or one each", name)
    return prompts


def _seeds(seed: Any, n: int) -> tuple[int, ...]:
    """Image i's generator seed: seed + i for one seed (A1111's batch convention), else the list given."""
    if isinstance(seed, int | np.integer) and not isinstance(seed, bool):
        seeds = tuple(int(seed) + i for i in range(n))
    elif isinstance(seed, Sequence) and not isinstance(seed, str):
        seeds = tuple(seed)
        if len(seeds) != n:
            raise BadInput(f"got {len(seeds)} seeds for num_images={n}; pass one seed or one each", "seed")
    else:
        raise BadInput(f"seed must be a non-negative integer or a list of them, got {seed!r}", "seed")
    if not all(isinstance(s, int | np.integer) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise BadInput(f"seeds must be non-negative integers, got {seed!r}", "seed")
    return tuple(int(s) for s in seeds)
