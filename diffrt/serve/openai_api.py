"""OpenAI's Images API on diffrt: POST /v1/images/generations, POST /v1/images/edits, GET /v1/models.

What the `openai` SDK and the clients built on it (Open WebUI, LibreChat) send and read. Names of OpenAI's own
models ("dall-e-3", "gpt-image-1") mean the server's current bundle; other names pick a served bundle. Fields
with no meaning here (quality, style, background, moderation, user, ...) are accepted and ignored, and listed
in the X-Diffrt-Ignored answer header; diffrt's own settings (negative_prompt, seed, num_inference_steps,
guidance_scale, scheduler, strength) may ride along, e.g. as the SDK's `extra_body`.
"""

from __future__ import annotations

import base64
import io
import json
import math
import secrets
import threading
import time
from collections import OrderedDict
from typing import Any

import numpy as np
from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, Response
from PIL import Image, PngImagePlugin
from starlette.datastructures import UploadFile

from diffrt.engine.images import open_image, parameters_text
from diffrt.engine.request import Request
from diffrt.engine.samplers import resolve_sampler
from diffrt.errors import BadInput
from diffrt.serve.app import Refusal, Service, _read_body

OPENAI_MODELS = ("dall-e-2", "dall-e-3", "gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5")  # the current bundle
IGNORED = ("quality", "style", "background", "moderation", "user", "partial_images", "input_fidelity")
FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
MEDIA = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# diffrt's settings that may ride along, and how a form field's text becomes one
EXTRAS: dict[str, type] = {
    "negative_prompt": str,
    "seed": int,
    "num_inference_steps": int,
    "guidance_scale": float,
    "scheduler": str,
    "strength": float,
    "prompt_syntax": str,
    "clip_skip": int,
}
MAX_N = 10  # OpenAI's own limit; the bundle's images per call may be lower
LINK_TTL_S = 600.0  # response_format "url": how long a link answers
MAX_LINKS = 256  # images kept for links; the oldest go first


class Links:
    """Encoded images behind unguessable, short-lived URLs (response_format "url"). In memory, bounded."""

    def __init__(self, ttl_s: float = LINK_TTL_S, max_items: int = MAX_LINKS):
        self.ttl_s, self.max_items = ttl_s, max_items
        self._items: OrderedDict[str, tuple[float, bytes, str]] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, data: bytes, media_type: str) -> str:
        token = secrets.token_urlsafe(24)
        with self._lock:
            self._items[token] = (time.monotonic() + self.ttl_s, data, media_type)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)
        return token

    def get(self, token: str) -> tuple[bytes, str] | None:
        with self._lock:
            now = time.monotonic()
            while self._items and next(iter(self._items.values()))[0] < now:
                self._items.popitem(last=False)
            item = self._items.get(token)
        return None if item is None else item[1:]


def error(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    """OpenAI's error shape; the type and code the SDK and its users read."""
    kind = {401: "invalid_request_error", 404: "invalid_request_error", 429: "rate_limit_exceeded"}.get(
        status, "invalid_request_error" if status < 500 else "server_error"
    )
    code = {404: "model_not_found", 429: "rate_limit_exceeded", 503: "model_loading", 504: "timeout"}.get(status)
    if status == 409:
        code = "interrupted"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _size(value: Any) -> tuple[int | None, int | None]:
    """(width, height) of "WxH"; (None, None) for "auto" or nothing (the bundle's or the image's size)."""
    if value in (None, "", "auto"):
        return None, None
    w, x, h = str(value).lower().partition("x")
    if not (x and w.isdigit() and h.isdigit()) or not (0 < int(w) <= 8192 and 0 < int(h) <= 8192):
        raise BadInput(f"size must be 'WIDTHxHEIGHT' (e.g. '512x512') or 'auto', got {value!r}", "size")
    return int(w), int(h)


def _int(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).strip().lstrip("-").isdigit():
        raise BadInput(f"{name} must be an integer from {low} to {high}, got {value!r}", name)
    if not low <= int(value) <= high:
        raise BadInput(f"{name} must be from {low} to {high}, got {value}", name)
    return int(value)


def _extras(fields: dict[str, Any]) -> dict[str, Any]:
    """diffrt's own settings among the fields, typed (form fields arrive as text)."""
    out: dict[str, Any] = {}
    for name, kind in EXTRAS.items():
        value = fields.get(name)
        if value is None or value == "":
            continue
        try:
            if kind is int:
                out[name] = _int(value, name, 0, 2**63 - 1)
            elif kind is float:
                if isinstance(value, bool) or not math.isfinite(float(value)):
                    raise ValueError
                out[name] = float(value)
            else:
                if not isinstance(value, str):
                    raise ValueError
                out[name] = value
        except (TypeError, ValueError):
            raise BadInput(f"{name} must be a {kind.__name__}, got {value!r}", name) from None
    if "scheduler" in out:
        out["scheduler"] = resolve_sampler(out["scheduler"])
    return out


def _common(fields: dict[str, Any]) -> tuple[dict[str, Any], str, str]:
    """Request settings shared by both routes, the response format and the output format."""
    prompt = fields.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadInput("prompt must be a non-empty string", "prompt")
    n = _int(fields.get("n", 1) if fields.get("n") is not None else 1, "n", 1, MAX_N)
    width, height = _size(fields.get("size"))
    response_format = fields.get("response_format") or "b64_json"
    if response_format not in ("b64_json", "url"):
        raise BadInput(f"response_format must be 'b64_json' or 'url', got {response_format!r}", "response_format")
    output_format = fields.get("output_format") or "png"
    if output_format not in FORMATS:
        raise BadInput(f"output_format must be one of {', '.join(FORMATS)}, got {output_format!r}", "output_format")
    if fields.get("stream") not in (None, False, "false"):
        raise BadInput("stream is not supported; leave it out for one answer with every image", "stream")
    given = {"prompt": prompt, "num_images": n, "width": width, "height": height, **_extras(fields)}
    return {k: v for k, v in given.items() if v is not None}, response_format, output_format


def _ignored(fields: dict[str, Any], known: set[str]) -> dict[str, str]:
    ignored = sorted(k for k in fields if k not in known)
    return {"X-Diffrt-Ignored": ",".join(ignored)} if ignored else {}


KNOWN = {"prompt", "model", "n", "size", "response_format", "output_format", "output_compression", "stream"}
KNOWN |= set(EXTRAS)


def _encode(image: Image.Image, output_format: str, compression: Any, text: str) -> bytes:
    buf = io.BytesIO()
    if output_format == "png":
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", text)
        image.save(buf, format="PNG", pnginfo=info)
    else:
        quality = 100 - _int(compression, "output_compression", 0, 100) if compression is not None else 90
        image.save(buf, format=FORMATS[output_format], quality=max(quality, 1))
    return buf.getvalue()


def _mask_from_alpha(data: bytes, field: str) -> Image.Image | None:
    """OpenAI's mask: fully transparent pixels are the area to repaint. As diffrt's mask (white = repaint);
    None when the image has no transparent pixel."""
    im = open_image(data, field)
    if "A" not in im.getbands() and "transparency" not in im.info:
        if field == "image":
            return None
        raise BadInput("mask must be a PNG with an alpha channel: transparent pixels are the area to repaint", field)
    alpha = np.asarray(im.convert("RGBA").getchannel("A"))
    if field == "image" and alpha.min() > 0:
        return None
    return Image.fromarray(np.where(alpha == 0, 255, 0).astype(np.uint8), "L")


async def _file(form, names: tuple[str, ...], limit: int) -> bytes | None:
    """The bytes of the one upload under any of `names` (None: none sent); BadInput for more than one."""
    uploads = [v for name in names for v in form.getlist(name)]
    if not uploads:
        return None
    if len(uploads) > 1:
        raise BadInput(f"{names[0]}: send one image (diffrt edits one image per request)", names[0])
    item = uploads[0]
    if not isinstance(item, UploadFile):
        raise BadInput(f"{names[0]} must be an uploaded file (multipart/form-data), not a text field", names[0])
    data = await item.read(limit + 1)
    if len(data) > limit:
        raise BadInput(f"{names[0]} is over {limit} bytes", names[0])
    return data


def add_routes(app: FastAPI, service: Service) -> None:
    links = Links()
    settings = service.settings

    def model_of(fields: dict[str, Any]) -> str:
        name = fields.get("model")
        if name is not None and not isinstance(name, str):
            raise BadInput("model must be a string", "model")
        return service.model(None if name in OPENAI_MODELS else name)

    async def answer(http: HTTPRequest, gen: Request, model: str, response_format, output_format, fields, headers):
        result = await service.run(http, gen, model)
        data = []
        for i, image in enumerate(result.images):
            text = parameters_text(gen.prompts[i], gen.negative_prompt, result.parameters, index=i)
            encoded = _encode(image, output_format, fields.get("output_compression"), text)
            if response_format == "url":
                token = links.add(encoded, MEDIA[output_format])
                data.append(
                    {"url": f"{str(http.base_url).rstrip('/')}/v1/images/files/{token}", "revised_prompt": None}
                )
            else:
                data.append({"b64_json": base64.b64encode(encoded).decode("ascii"), "revised_prompt": None})
        width, height = result.parameters["width"], result.parameters["height"]
        body = {"created": int(time.time()), "data": data, "output_format": output_format, "size": f"{width}x{height}"}
        return JSONResponse(body, headers={"X-Batch-Images": str(result.batch_images), **headers})

    @app.post("/v1/images/generations")
    async def generations(http: HTTPRequest) -> Response:
        """OpenAI's image generation: JSON in, `{created, data: [{b64_json | url}]}` out."""
        body = await _read_body(http, settings.max_body_bytes)
        if body is None:
            return error(413, f"request body is over {settings.max_body_bytes} bytes")
        try:
            fields = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return error(400, "the body is not valid JSON; send a JSON object")
        if not isinstance(fields, dict):
            return error(400, "the body must be a JSON object")
        try:
            model = model_of(fields)
            given, response_format, output_format = _common(fields)
            gen = await service.resolve(Request(**given), model)
            headers = _ignored(fields, KNOWN)
            return await answer(http, gen, model, response_format, output_format, fields, headers)
        except BadInput as e:
            return error(422, str(e), e.field)
        except Refusal as e:
            return error(e.status, e.message, e.field, e.headers)

    @app.post("/v1/images/edits")
    async def edits(http: HTTPRequest) -> Response:
        """OpenAI's image edit (multipart): inpainting where the mask (or the image) is transparent, else image
        to image of the whole picture."""
        body = await _read_body(http, settings.max_body_bytes)
        if body is None:
            return error(413, f"request body is over {settings.max_body_bytes} bytes")
        if not http.headers.get("content-type", "").startswith("multipart/form-data"):
            return error(400, "send the edit as multipart/form-data (image, mask, prompt, ...)")
        http._body = body  # parse what was read, within the limit
        try:
            form = await http.form(max_files=4, max_fields=64)
        except Exception as e:  # noqa: BLE001 - malformed multipart: Starlette raises several types
            return error(400, f"malformed multipart body ({type(e).__name__}); send multipart/form-data")
        try:
            fields = {k: v for k, v in form.multi_items() if not isinstance(v, UploadFile)}
            model = model_of(fields)
            given, response_format, output_format = _common(fields)
            image = await _file(form, ("image", "image[]"), settings.max_body_bytes)
            if image is None:
                raise BadInput("image is required: the picture to edit, as a file", "image")
            mask = await _file(form, ("mask",), settings.max_body_bytes)
            mask_image = _mask_from_alpha(mask, "mask") if mask is not None else _mask_from_alpha(image, "image")
            if mask_image is not None:
                given.update(mask_image=mask_image, paste_back=True)
            gen = await service.resolve(Request(image=image, **given), model)
            headers = _ignored(fields, KNOWN)
            return await answer(http, gen, model, response_format, output_format, fields, headers)
        except BadInput as e:
            return error(422, str(e), e.field)
        except Refusal as e:
            return error(e.status, e.message, e.field, e.headers)

    @app.get("/v1/images/files/{token}")
    async def image_file(token: str) -> Response:
        """A short-lived link of response_format "url" (no API key: the token is the secret)."""
        item = links.get(token)
        if item is None:
            return error(404, "no such image, or its link expired; ask for response_format b64_json to keep it")
        return Response(item[0], media_type=item[1], headers={"Cache-Control": "private, max-age=60"})

    @app.get("/v1/models")
    async def models() -> dict:
        """The served bundles, as OpenAI's model list."""
        created = int(service.started)
        data = [
            {"id": m.name, "object": "model", "created": created, "owned_by": "diffrt"}
            for m in service.pool.models.values()
        ]
        return {"object": "list", "data": data}
