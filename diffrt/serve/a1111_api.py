"""AUTOMATIC1111's web API on diffrt, under /sdapi/v1: what `webuiapi`, SillyTavern and Open WebUI send.

A1111's fields that change the picture in ways diffrt cannot follow (scripts, styles, variation seeds, tiling,
face restoration, clip skip > 1) are refused with a 422 naming them; fields about saving, previews and the UI
are accepted and ignored. Unknown fields are ignored, as A1111 does (clients forward extra keys verbatim).
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, Response
from PIL import ImageOps

from diffrt.bundle import token_widths
from diffrt.engine.embeddings import load_embeddings
from diffrt.engine.hires import UPSCALERS, HiresOptions
from diffrt.engine.images import A1111_NAMES, open_image, parameters_text
from diffrt.engine.lora import SUFFIX, lora_names
from diffrt.engine.request import Request
from diffrt.engine.samplers import A1111_SAMPLERS, A1111_SCHEDULERS, a1111_sampler
from diffrt.errors import BadInput
from diffrt.serve.app import Refusal, Service, _b64, _png, _read_body
from diffrt.serve.progress import preview_png

PREFIX = "/sdapi/v1"
MAX_SEED = 2**32 - 1  # A1111's seeds; -1 draws one


def error(status: int, message: str, field: str | None = None, headers: dict | None = None) -> JSONResponse:
    """FastAPI's shapes, as A1111 answers: 422 lists the field in `detail`, other errors give `detail` text."""
    if status == 422:
        detail: Any = [{"loc": ["body", field or "body"], "msg": message, "type": "value_error"}]
    else:
        detail = message
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _refuse_unsupported(f: dict[str, Any]) -> None:
    checks = (
        ("script_name", bool(f.get("script_name")), "scripts are not available"),
        ("alwayson_scripts", bool(f.get("alwayson_scripts")), "scripts (ControlNet, ADetailer, ...) are not available"),
        ("styles", bool(f.get("styles")), "saved styles are not available; put the style's words in the prompt"),
        ("subseed_strength", bool(f.get("subseed_strength")), "variation seeds are not available"),
        ("tiling", bool(f.get("tiling")), "tiling is not available"),
        ("restore_faces", bool(f.get("restore_faces")), "face restoration is not available"),
    )
    for name, bad, why in checks:
        if bad:
            raise BadInput(f"{name}: {why}; leave it out", name)


def overrides(f: dict[str, Any]) -> dict[str, Any]:
    """A request's `override_settings`: A1111's settings for this request only (a JSON object)."""
    value = f.get("override_settings") or {}
    if not isinstance(value, dict):
        raise BadInput("override_settings must be a JSON object of A1111 settings", "override_settings")
    return value


def _number(f: dict[str, Any], name: str, kind: type, default=None):
    value = f.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadInput(f"{name} must be a number, got {value!r}", name)
    if kind is int and value != int(value):
        raise BadInput(f"{name} must be an integer, got {value!r}", name)
    return kind(value)


def _settings(f: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """A1111's fields as diffrt Request settings, and the seed used (-1 drawn here)."""
    _refuse_unsupported(f)
    prompt = f.get("prompt", "")
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadInput("prompt must be a non-empty string", "prompt")
    seed = _number(f, "seed", int, -1)
    if seed is None or seed < 0:
        seed = secrets.randbelow(MAX_SEED + 1)
    batch_size, n_iter = _number(f, "batch_size", int, 1) or 1, _number(f, "n_iter", int, 1) or 1
    if batch_size < 1 or n_iter < 1:
        raise BadInput("batch_size and n_iter must be >= 1", "batch_size")
    given: dict[str, Any] = {
        "prompt": prompt,
        "negative_prompt": f.get("negative_prompt") or None,
        "num_inference_steps": _number(f, "steps", int),
        "guidance_scale": _number(f, "cfg_scale", float),
        "scheduler": a1111_sampler(f.get("sampler_name") or f.get("sampler_index"), f.get("scheduler")),
        "width": _number(f, "width", int),
        "height": _number(f, "height", int),
        "num_images": batch_size * n_iter,  # one call: image i draws from seed + i, as A1111's
        "seed": seed,
        # A1111 sets clip skip as a setting; 0 or absent: the bundle's default
        "clip_skip": _number(overrides(f), "CLIP_stop_at_last_layers", int) or None,
    }
    return {k: v for k, v in given.items() if v is not None}, seed


def _hires(f: dict[str, Any], width: int | None) -> HiresOptions | None:
    if not f.get("enable_hr"):
        return None
    scale = _number(f, "hr_scale", float, HiresOptions.scale)
    resize_x = _number(f, "hr_resize_x", int, 0)
    if resize_x and width:
        scale = resize_x / width
    steps = _number(f, "hr_second_pass_steps", int, 0) or None
    strength = _number(f, "denoising_strength", float, HiresOptions.strength)
    upscaler = f.get("hr_upscaler") or HiresOptions.upscaler
    return HiresOptions(scale=scale, upscaler=upscaler, steps=steps, strength=strength)


def _image(text: Any, field: str) -> bytes:
    if not isinstance(text, str):
        raise BadInput(f"{field} must be a base64 string of an image file", field)
    return _b64(text, field)


def _info(gen: Request, result, model, seed: int, prompt: str) -> dict[str, Any]:
    """`prompt` as sent (A1111 records its <lora:...> tags, which the resolved prompts no longer hold)."""
    p = result.parameters
    texts = [parameters_text(prompt, gen.negative_prompt, p, index=i) for i in range(len(result.images))]
    return {
        "prompt": prompt,
        "all_prompts": [prompt] * len(gen.prompts),
        "negative_prompt": gen.negative_prompt or "",
        "all_negative_prompts": [gen.negative_prompt or ""] * len(gen.prompts),
        "seed": seed,
        "all_seeds": list(p["all_seeds"]),
        "subseed": -1,
        "all_subseeds": [-1] * len(gen.prompts),
        "subseed_strength": 0,
        "width": p["width"],
        "height": p["height"],
        "sampler_name": A1111_NAMES.get(p["scheduler"], p["scheduler"]),
        "cfg_scale": p["guidance_scale"],
        "steps": p["num_inference_steps"],
        "batch_size": len(gen.prompts),
        "restore_faces": False,
        "sd_model_name": model.name,
        "sd_model_hash": model.short_hash,
        "denoising_strength": p.get("strength") or p.get("hires_strength") or 0,
        "index_of_first_image": 0,
        "infotexts": texts,
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": 1,
        "version": "diffrt",
    }


def add_routes(app: FastAPI, service: Service) -> None:
    settings = service.settings
    progress = service.batcher.progress

    async def fields_of(http: HTTPRequest) -> dict[str, Any] | Response:
        body = await _read_body(http, settings.max_body_bytes)
        if body is None:
            return error(413, f"request body is over {settings.max_body_bytes} bytes")
        try:
            fields = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return error(400, "the body is not valid JSON; send a JSON object")
        return fields if isinstance(fields, dict) else error(422, "the body must be a JSON object")

    async def generate(http: HTTPRequest, image_job: bool) -> Response:
        f = await fields_of(http)
        if isinstance(f, Response):
            return f
        try:
            model = service.model(overrides(f).get("sd_model_checkpoint"))
            given, seed = _settings(f)
            if image_job:
                images = f.get("init_images") or []
                if not isinstance(images, list) or len(images) != 1:
                    raise BadInput(
                        "init_images must hold one base64 image (diffrt runs one per request)", "init_images"
                    )
                given["image"] = _image(images[0], "init_images")
                given["strength"] = _number(f, "denoising_strength", float, 0.75)
                if f.get("mask"):
                    mask = open_image(_image(f["mask"], "mask"), "mask").convert("L")  # within the pixel limit
                    if f.get("inpainting_mask_invert"):
                        mask = ImageOps.invert(mask)
                    given.update(mask_image=mask, paste_back=True, mask_blur=_number(f, "mask_blur", int, 4))
            else:
                hires = _hires(f, given.get("width"))
                if hires is not None:
                    given["hires"] = hires
                if f.get("refiner_switch_at") and f.get("refiner_checkpoint"):
                    given["refiner_at"] = _number(f, "refiner_switch_at", float)
            gen = await service.resolve(Request(**given), model)
            result = await service.run(http, gen, model)
        except BadInput as e:
            return error(422, str(e), e.field)
        except Refusal as e:
            return error(e.status, e.message, e.field, e.headers)
        info = _info(gen, result, service.pool.models[model], seed, given["prompt"])
        send = f.get("send_images", True) is not False
        images = [
            base64.b64encode(_png(im, info["infotexts"][i])).decode("ascii") for i, im in enumerate(result.images)
        ]
        parameters = {k: v for k, v in f.items() if k not in ("init_images", "mask")}
        return JSONResponse({"images": images if send else [], "parameters": parameters, "info": json.dumps(info)})

    @app.post(f"{PREFIX}/txt2img")
    async def txt2img(http: HTTPRequest) -> Response:
        return await generate(http, image_job=False)

    @app.post(f"{PREFIX}/img2img")
    async def img2img(http: HTTPRequest) -> Response:
        return await generate(http, image_job=True)

    @app.get(f"{PREFIX}/options")
    async def get_options() -> dict:
        m = service.pool.models[service.current]
        return {
            "sd_model_checkpoint": m.title,
            "sd_checkpoint_hash": m.sha256,
            "samples_format": "png",
            "CLIP_stop_at_last_layers": 1,
            "sd_vae": "Automatic",
        }

    @app.post(f"{PREFIX}/options")
    async def set_options(http: HTTPRequest) -> Response:
        """Only sd_model_checkpoint is used (it selects the bundle of requests that name none)."""
        f = await fields_of(http)
        if isinstance(f, Response):
            return f
        if f.get("sd_model_checkpoint"):
            try:
                service.current = service.model(f["sd_model_checkpoint"])
            except Refusal as e:
                return error(e.status, e.message, "sd_model_checkpoint")
        return JSONResponse(None)

    @app.get(f"{PREFIX}/sd-models")
    async def sd_models() -> list:
        return [
            {
                "title": m.title,
                "model_name": m.name,
                "hash": m.short_hash,
                "sha256": m.sha256,
                "filename": m.name,  # a name only: the server's paths stay its own
                "config": None,
            }
            for m in service.pool.models.values()
        ]

    @app.get(f"{PREFIX}/samplers")
    async def samplers() -> list:
        karras = ("DPM++ 2M", "DPM++ 2M SDE")
        return [
            {"name": n, "aliases": [], "options": {"scheduler": "karras"} if n in karras else {}}
            for n in A1111_SAMPLERS
        ]

    @app.get(f"{PREFIX}/schedulers")
    async def schedulers() -> list:
        return [
            {"name": k, "label": v, "aliases": None, "default_rho": -1, "need_inner_model": False}
            for k, v in A1111_SCHEDULERS.items()
        ]

    @app.get(f"{PREFIX}/upscalers")
    async def upscalers() -> list:
        out = [{"name": "None", "model_name": None, "model_path": None, "model_url": None, "scale": 4}]
        if service.pool.models[service.current].manifest.components.get("upscaler") is not None:
            out.append({"name": "ESRGAN", "model_name": "bundle", "model_path": None, "model_url": None, "scale": 4})
        return out

    @app.get(f"{PREFIX}/latent-upscale-modes")
    async def latent_modes() -> list:
        return [{"name": name} for key, name in UPSCALERS.items() if key.startswith("latent")]

    @app.get(f"{PREFIX}/sd-vae")
    async def sd_vae() -> list:
        return []  # the bundle's own VAE only

    @app.get(f"{PREFIX}/embeddings")
    async def embeddings() -> dict:
        """A1111's listing: the embeddings of --embeddings that fit the current bundle's text encoders."""
        if not settings.embeddings:
            return {"loaded": {}, "skipped": {}}
        widths = token_widths(service.pool.models[service.current].manifest)
        found = await asyncio.to_thread(load_embeddings, settings.embeddings, widths, settings.allow_pickle)
        entry = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None}
        loaded = {n: {**entry, "shape": widths[-1], "vectors": len(e.vectors[0])} for n, e in found.items()}
        return {"loaded": loaded, "skipped": {}}

    @app.get(f"{PREFIX}/loras")
    async def loras() -> list:
        """A1111's listing: the LoRAs of --lora-dir, by the names prompts call them (<lora:NAME:SCALE>)."""
        if not settings.lora_dir:
            return []
        names = await asyncio.to_thread(lora_names, settings.lora_dir)
        return [{"name": n, "alias": n, "path": n + SUFFIX, "metadata": {}} for n in names]

    @app.get(f"{PREFIX}/scripts")
    async def scripts() -> dict:
        return {"txt2img": [], "img2img": []}

    @app.get(f"{PREFIX}/progress")
    async def get_progress(skip_current_image: bool = False) -> dict:
        snap = progress.snapshot(with_latents=not skip_current_image)
        current = None
        if snap.latents is not None:
            current = base64.b64encode(preview_png(snap.latents)).decode("ascii")
        jobs = service.batcher.depth + service.batcher.running
        state = {
            "skipped": False,
            "interrupted": snap.interrupted,
            "job": "txt2img" if snap.running else "",
            "job_count": jobs,
            "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(snap.started or time.time())),
            "job_no": 0,
            "sampling_step": snap.step,
            "sampling_steps": snap.total,
        }
        return {
            "progress": snap.fraction,
            "eta_relative": snap.eta,
            "state": state,
            "current_image": current,
            "textinfo": None,
        }

    @app.post(f"{PREFIX}/interrupt")
    async def interrupt() -> dict:
        """Stop the running call at its next step: its requests end with 409 (A1111 would return the partial
        image)."""
        return {"interrupted": progress.interrupt()}

    @app.post(f"{PREFIX}/skip")
    async def skip() -> dict:
        return {"interrupted": progress.interrupt()}
