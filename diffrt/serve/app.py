"""FastAPI app for `diffrt serve`: one process, one Pipeline, an in-process micro-batcher.

`create_app(settings)` returns the ASGI app. The bundle loads (and a warm-up image is generated) in the
background after start-up: /healthz answers at once, /readyz only once the engine can serve.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import logging
import math
import re
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, Response
from PIL import PngImagePlugin
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from diffrt.engine.hires import UPSCALERS, HiresOptions
from diffrt.engine.images import parameters_text
from diffrt.engine.prompts import SYNTAXES
from diffrt.engine.request import REFINER_AT, Request, bundle_defaults, size_multiple, size_range
from diffrt.engine.samplers import SAMPLERS, resolve_sampler
from diffrt.errors import BadInput
from diffrt.serve.batcher import Batcher, JobResult, QueueFull
from diffrt.serve.models import Model, ModelPool
from diffrt.serve.progress import Interrupted, preview_png
from diffrt.specs import MAX_CLIP_SKIP

log = logging.getLogger(__name__)

IMAGES_PATH = "/v1/images"
# Requests that generate, in every protocol: counted by status code in diffrt_requests_total
GENERATION_PATHS = (IMAGES_PATH, "/v1/images/generations", "/v1/images/edits", "/sdapi/v1/txt2img", "/sdapi/v1/img2img")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")  # echo only ids that are safe in headers and logs


@dataclass
class ServeSettings:
    bundle: str = ""  # the default model, loaded and warmed up at start-up
    others: tuple[str, ...] = ()  # more bundles, picked per request by name, loaded when first asked for
    max_loaded: int = 1  # Pipelines kept loaded at once; the least recently used is unloaded beyond it
    api_key: str | None = None  # every route but /healthz and /readyz then needs the key (Bearer, or Basic password)
    backend: str = "auto"
    threads: int = 0
    max_batch: int = 4  # images per pipeline call (capped at the bundle's batch range)
    batch_wait_ms: float = 10.0  # how long the oldest request waits for partners
    max_queue: int = 64  # requests waiting for the engine (not counting the batch running); more -> 429
    timeout_s: float = 300.0  # queue wait + generation; longer -> 504
    max_body_bytes: int = 16 * 2**20  # room for an init image and a mask as base64
    refiner: str | None = None  # SDXL refiner bundle (Pipeline.load(refiner=))
    embeddings: str | None = None  # textual inversion folder, for every bundle (Pipeline.load(embeddings=))
    allow_pickle: bool = False  # also .pt/.bin embeddings
    lora_dir: str | None = None  # LoRAs requests name (never a path from a request), for every bundle


BUNDLE_DEFAULT = "default: the bundle's"


class HiresRequest(BaseModel):
    """A1111's hires fix: a second pass at scale x the size. Fields left out take HiresOptions' defaults."""

    model_config = ConfigDict(extra="forbid", strict=True)

    scale: float | None = Field(None, ge=1, le=4, allow_inf_nan=False, description=f"default {HiresOptions.scale:g}")
    upscaler: str | None = Field(None, description=f"{', '.join(UPSCALERS)} (default {HiresOptions.upscaler})")
    steps: int | None = Field(None, ge=1, le=150, description="default: num_inference_steps")
    strength: float | None = Field(
        None, gt=0, le=1, allow_inf_nan=False, description=f"default {HiresOptions.strength:g}"
    )


class LoraRequest(BaseModel):
    """One LoRA of --lora-dir by its file name (with or without .safetensors), and its scale."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1, max_length=255, description="a file name in the server's --lora-dir")
    scale: float = Field(1.0, ge=0, le=16, allow_inf_nan=False, description="strength (1: as trained)")


class ImageRequest(BaseModel):
    """POST /v1/images. Strict: "10" is not 10, unknown fields are errors (a typo must not be ignored). A field
    left out (or null) takes the generation default of diffrt's Request for this bundle."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1, description="non-empty; past the bundle's 75-token chunks is truncated, warned")
    model: str | None = Field(None, description="a served bundle's name (GET /v1/models); default: the first")
    negative_prompt: str | None = None
    prompt_syntax: str | None = Field(
        None, description=f"{' or '.join(SYNTAXES)}; default a1111: (word:1.3), (word), [word], BREAK"
    )
    clip_skip: int | None = Field(
        None, ge=1, le=MAX_CLIP_SKIP, description="A1111's Clip skip: 1 the last layer (default), 2 the one before"
    )
    num_inference_steps: int | None = Field(None, ge=1, le=150, description=BUNDLE_DEFAULT)
    guidance_scale: float | None = Field(None, ge=0, le=30, allow_inf_nan=False, description=BUNDLE_DEFAULT)
    scheduler: str | None = Field(None, description=f"short, diffusers class or A1111 sampler name; {BUNDLE_DEFAULT}")
    width: int | None = Field(None, ge=1, le=8192, description="default: the native size (image to image: the image's)")
    height: int | None = Field(None, ge=1, le=8192)
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="image i draws from seed + i")
    num_images: int | None = Field(None, ge=1, le=64, description="at most the bundle's images per call")
    upscale: bool | None = None
    prompt_2: str | None = Field(None, description="SDXL: the second text encoder's prompt")
    negative_prompt_2: str | None = None
    image: str | None = Field(None, description="init image, base64 (or a data: URL) of a PNG, JPEG or WebP")
    mask_image: str | None = Field(None, description="inpainting mask like image: white = repaint")
    strength: float | None = Field(None, gt=0, le=1, allow_inf_nan=False, description="default: the job's (diffusers')")
    paste_back: bool | None = Field(None, description="inpainting: paste the unmasked original back")
    mask_blur: int | None = Field(None, ge=0, le=64, description="pixels of blur on the paste-back mask")
    hires: HiresRequest | None = Field(None, description="text to image: a second pass at a larger size")
    loras: list[LoraRequest] | None = Field(
        None, max_length=8, description="LoRAs of --lora-dir merged for this request (also <lora:NAME:SCALE>)"
    )
    refiner_at: float | None = Field(
        None, gt=0, lt=1, allow_inf_nan=False, description=f"with --refiner ({REFINER_AT:g})"
    )

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("prompt must not be blank")
        return v

    @field_validator("prompt_syntax")
    @classmethod
    def _syntax(cls, v: str | None) -> str | None:
        if v is not None and v not in SYNTAXES:
            raise ValueError(f"choose one of {', '.join(SYNTAXES)}")
        return v

    @field_validator("scheduler")
    @classmethod
    def _sampler(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            return resolve_sampler(v)
        except BadInput as e:
            raise ValueError(str(e)) from None


class Metrics:
    """Prometheus metrics on a registry of the app's own, so several apps can live in one process (tests)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "diffrt_requests_total", "image requests (every protocol) by status code", ["code"], registry=r
        )
        self.latency = Histogram(
            "diffrt_request_seconds",
            "image request latency, end to end (every protocol)",
            registry=r,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
        )
        self.queue_wait = Histogram(
            "diffrt_queue_wait_seconds",
            "time from admission to the engine",
            registry=r,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.stage_seconds = Histogram(
            "diffrt_stage_seconds",
            "pipeline stage time per engine call",
            ["stage"],
            registry=r,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.queue_depth = Gauge("diffrt_queue_depth", "requests waiting for the engine", registry=r)
        self.batch_images = Histogram(
            "diffrt_batch_images", "images per engine call", registry=r, buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64)
        )
        self.images = Counter("diffrt_images_generated_total", "images generated for requests", registry=r)
        self.dropped = Counter(
            "diffrt_requests_dropped_total", "admitted requests that never reached the engine", ["reason"], registry=r
        )
        self.ready = Gauge("diffrt_ready", "1 once the bundle is loaded and warmed up", registry=r)


def _error(
    status: int, message: str, field: str | None = None, headers: dict | None = None, errors: list | None = None
) -> JSONResponse:
    body: dict[str, Any] = {"detail": message}
    if field:
        body["field"] = field
    if errors:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_error(e: ValidationError) -> JSONResponse:
    errors = [{"field": ".".join(str(p) for p in err["loc"]) or "body", "message": err["msg"]} for err in e.errors()]
    status = 400 if any(err["type"] == "json_invalid" for err in e.errors()) else 422
    first = errors[0]
    return _error(status, f"{first['field']}: {first['message']}", first["field"], errors=errors)


def _field_of(e: BadInput) -> str | None:
    """The request field a BadInput names (e.field), else the first field name its message mentions."""
    if e.field:
        return e.field
    message = str(e)
    hits = [(message.find(f), f) for f in ImageRequest.model_fields if f in message]
    return min(hits)[1] if hits else None


def _b64(text: str, field: str) -> bytes:
    """Bytes of a base64 string or a data: URL; BadInput naming the field otherwise."""
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadInput(f"{field} is not valid base64; send the image file's bytes base64-encoded", field) from None


def to_request(req: ImageRequest) -> Request:
    """The service's JSON as diffrt's one Request type: fields left out keep the Request's defaults."""
    given = req.model_dump(exclude_none=True)
    given.pop("model", None)
    for name in ("image", "mask_image"):
        if name in given:
            given[name] = _b64(given[name], name)
    if "hires" in given:
        given["hires"] = HiresOptions(**given["hires"])
    if "loras" in given:
        given["loras"] = tuple((lora["name"], lora["scale"]) for lora in given["loras"])
    return Request(given.pop("prompt"), **given)


def _png(image, text: str) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


class RequestIdAndMetrics:
    """Pure ASGI middleware (no BaseHTTPMiddleware: it wraps `receive`, which hides client disconnects):
    echoes or makes X-Request-ID on every response and counts /v1/images answers by status code."""

    def __init__(self, app, metrics: Metrics | Callable[[], Metrics], echo_id: bool = True):
        # A callable is resolved per request: a Ray Serve ingress app is pickled to its replicas, and each
        # replica process keeps metrics of its own (a registry holds locks, which do not pickle). Behind Ray's
        # proxy, which sets X-Request-ID on every answer itself, echo_id=False avoids a second header.
        self.app, self.metrics, self.echo_id = app, metrics, echo_id

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        metrics = self.metrics if isinstance(self.metrics, Metrics) else self.metrics()
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        start, counted = time.perf_counter(), scope["path"] in GENERATION_PATHS

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                if self.echo_id:
                    message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
                if counted:
                    metrics.requests.labels(code=str(message["status"])).inc()
                    metrics.latency.observe(time.perf_counter() - start)
            await send(message)

        await self.app(scope, receive, send_with_id)


OPEN_PATHS = ("/healthz", "/readyz")  # answered without the API key (probes)
OPENAI_PREFIXES = ("/v1/images/", "/v1/models")  # errors there take OpenAI's shape


class OneSlash:
    """Pure ASGI middleware: "//sdapi/v1/options" is "/sdapi/v1/options" (clients join a base URL ending in "/")."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and "//" in scope["path"]:
            scope = {**scope, "path": re.sub("/{2,}", "/", scope["path"])}
        await self.app(scope, receive, send)


class ApiKey:
    """Pure ASGI middleware: with `--api-key`, every route but the probes and short-lived image links needs
    "Authorization: Bearer KEY" (OpenAI's clients) or HTTP Basic with KEY as the password (A1111's --api-auth
    clients). Compared in constant time."""

    def __init__(self, app, key: str, open_prefixes: tuple[str, ...] = ()):
        self.app, self.key, self.open_prefixes = app, key.encode(), open_prefixes

    def _given(self, header: bytes) -> bytes:
        scheme, _, value = header.partition(b" ")
        if scheme.lower() == b"bearer":
            return value.strip()
        if scheme.lower() == b"basic":
            try:
                return base64.b64decode(value.strip(), validate=True).partition(b":")[2]
            except (binascii.Error, ValueError):
                return b""
        return b""

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or path in OPEN_PATHS or path.startswith(self.open_prefixes):
            return await self.app(scope, receive, send)
        given = self._given(dict(scope["headers"]).get(b"authorization", b""))
        if hmac.compare_digest(given, self.key):
            return await self.app(scope, receive, send)
        message = "missing or wrong API key: send the header Authorization: Bearer KEY (the server's --api-key)"
        if path.startswith(OPENAI_PREFIXES):
            body = {
                "error": {"message": message, "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}
            }
        else:
            body = {"detail": message}
        # a browser opening the page asks for a password (the key) and sends it on the page's own requests
        page = path == "/" or path.startswith("/page/")
        headers = {"WWW-Authenticate": 'Basic realm="diffrt", charset="UTF-8"' if page else "Bearer"}
        await JSONResponse(body, status_code=401, headers=headers)(scope, receive, send)


async def _read_body(request: HTTPRequest, limit: int) -> bytes | None:
    """The body, or None when it is over `limit` (checked before reading it all, and again while reading)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


# The OpenAPI description of POST /v1/images, shared by the single-process app and the Ray Serve deployment.
IMAGES_ROUTE: dict[str, Any] = {
    "openapi_extra": {
        "requestBody": {"required": True, "content": {"application/json": {"schema": ImageRequest.model_json_schema()}}}
    },
    "responses": {
        200: {
            "content": {"image/png": {}, "application/json": {}},
            "description": "PNG (Accept: image/png) or JSON with base64 PNGs",
        }
    },
}


async def read_images_request(request: HTTPRequest, settings: ServeSettings) -> ImageRequest | Response:
    """The validated request, or the 4xx answer that refuses it. The body is read and validated by hand: the
    size cap must apply before parsing, and errors name the field in one consistent shape."""
    body = await _read_body(request, settings.max_body_bytes)
    if body is None:
        return _error(413, f"request body is over {settings.max_body_bytes} bytes", "body")
    try:
        return ImageRequest.model_validate_json(body)
    except ValidationError as e:
        return _validation_error(e)


async def resolve_request(req: ImageRequest, pipe: Any) -> Request | Response:
    """The request resolved against the bundle (its defaults filled, images decoded), or a 422. Limits depend on
    the bundle: they are checked before queueing so a bad request never joins a batch. Images are decoded off
    the event loop."""
    try:
        return await checked(to_request(req), pipe.check_request)
    except BadInput as e:
        return _error(422, str(e), _field_of(e))


async def checked(request: Request, check: Callable[[Request], Request]) -> Request:
    """`check(request)`, off the event loop when there are images to decode."""
    if request.image is None:
        return check(request)
    return await asyncio.to_thread(check, request)


def engine_error(request: HTTPRequest, e: Exception) -> JSONResponse:
    """The answer to a generation that raised: 422 for a refused request, 500 for an engine failure."""
    if isinstance(e, BadInput):
        return _error(422, str(e), _field_of(e))
    log.error("request %s failed: %s: %s", request.scope["state"]["request_id"], type(e).__name__, e)
    return _error(500, f"{type(e).__name__}: {e}")


def images_response(request: HTTPRequest, gen: Request, result: JobResult, headers: dict[str, str]) -> Response:
    """`Accept: image/png` gets the first image as a PNG; otherwise JSON with every image as base64 PNG."""
    headers = {"X-Batch-Images": str(result.batch_images), **headers}

    def text(i: int) -> str:
        return parameters_text(gen.prompts[i], gen.negative_prompt, result.parameters, index=i)

    if "image/png" in request.headers.get("accept", ""):
        return Response(_png(result.images[0], text(0)), media_type="image/png", headers=headers)
    encoded = [base64.b64encode(_png(im, text(i))).decode("ascii") for i, im in enumerate(result.images)]
    timings = {k: round(v, 6) for k, v in result.timings.items() if math.isfinite(v)}
    return JSONResponse({"images": encoded, "parameters": result.parameters, "timings": timings}, headers=headers)


class Refusal(Exception):
    """A request the service answers with a 4xx or 5xx; each protocol writes it in its own error shape."""

    def __init__(self, status: int, message: str, field: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.field, self.headers = status, message, field, headers


class Service:
    """What every protocol's routes share: the models, the batcher, readiness, and one way to run a request."""

    def __init__(self, settings: ServeSettings, loader: Callable[[str], Any] | None = None):
        self.settings, self.metrics = settings, Metrics()
        self.pool = ModelPool([settings.bundle, *settings.others], loader or self._load, settings.max_loaded)
        self.batcher = Batcher(settings.max_batch, settings.batch_wait_ms / 1000, settings.max_queue, self.metrics)
        self.batcher.set_pool(self.pool)
        self.state: dict[str, Any] = {"ready": False, "error": None}
        self.started = time.time()
        self.current = self.pool.default  # the model of requests that name none (A1111's options select it)

    def _load(self, path: str) -> Any:
        from diffrt.engine.pipeline import Pipeline

        refiner = self.settings.refiner if path == self.settings.bundle else None
        s = self.settings
        return Pipeline.load(path, s.backend, s.threads, refiner, embeddings=s.embeddings, allow_pickle=s.allow_pickle,
                             lora_dir=s.lora_dir, lora_paths=False)  # fmt: skip

    async def start(self) -> None:
        try:
            t0 = time.perf_counter()
            pipe = await self.batcher.run_in_engine(lambda: self.pool.pipeline(self.pool.default))
            # One real generation: first calls allocate buffers, build CUDA graphs / pick kernels.
            await self.batcher.run_in_engine(pipe.warm_up)
            self.state["ready"] = True
            self.metrics.ready.set(1)
            log.info("ready in %.1f s (max batch %d images)", time.perf_counter() - t0, self.batcher.max_batch)
        except Exception as e:
            self.state["error"] = f"{type(e).__name__}: {e}"
            log.exception("loading the bundle failed; /readyz stays 503")

    def model(self, name: str | None) -> str:
        """The pool's name for what a client asked for (None: the current one); Refusal 404 for an unknown one."""
        if not name:
            return self.current
        try:
            return self.pool.find(name).name
        except BadInput as e:
            raise Refusal(404, str(e), "model") from None

    async def resolve(self, request: Request, model: str) -> Request:
        """The request resolved against its model's bundle, before queueing; Refusal 422 naming the field."""
        try:
            return await checked(request, lambda r: self.pool.check(model, r))
        except BadInput as e:
            raise Refusal(422, str(e), _field_of(e)) from None

    async def run(self, http: HTTPRequest, request: Request, model: str) -> JobResult:
        """Queue a resolved request and wait for its images; every way it can fail is a Refusal."""
        if not self.state["ready"]:
            raise Refusal(503, "the model is still loading", headers={"Retry-After": "5"})
        try:
            job = self.batcher.submit(request, http.is_disconnected, model)
        except QueueFull as e:
            raise Refusal(429, f"{e}; retry later", headers={"Retry-After": "1"}) from None
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), self.settings.timeout_s)
        except asyncio.TimeoutError:
            self.batcher.withdraw(job, "timeout")
            raise Refusal(504, f"not finished within {self.settings.timeout_s:g} s") from None
        except asyncio.CancelledError:
            self.batcher.withdraw(job, "cancelled")
            raise
        except Interrupted:
            raise Refusal(409, "interrupted before it finished (an interrupt was asked for); send it again") from None
        except BadInput as e:
            raise Refusal(422, str(e), _field_of(e)) from None
        except Exception as e:  # noqa: BLE001 - the engine failed (NonFiniteOutput, backend errors)
            log.error("request %s failed: %s: %s", http.scope["state"]["request_id"], type(e).__name__, e)
            raise Refusal(500, f"{type(e).__name__}: {e}") from None


def create_app(settings: ServeSettings, loader: Callable[[str], Any] | None = None) -> FastAPI:
    """`loader(path)` returns a bundle's Pipeline (default: Pipeline.load(path, ...)); tests pass their own."""
    service = Service(settings, loader)
    metrics, batcher, state = service.metrics, service.batcher, service.state

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        loading = asyncio.create_task(service.start())
        try:
            yield
        finally:
            loading.cancel()
            await batcher.stop()

    app = FastAPI(title="diffrt", summary="Stable Diffusion images from diffrt bundles", lifespan=lifespan)
    app.state.batcher, app.state.metrics, app.state.serve, app.state.service = batcher, metrics, state, service
    app.add_middleware(RequestIdAndMetrics, metrics=metrics)
    if settings.api_key:
        app.add_middleware(ApiKey, key=settings.api_key, open_prefixes=("/v1/images/files/",))
    app.add_middleware(OneSlash)  # added last: runs first

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> Response:
        if state["ready"]:
            return JSONResponse({"status": "ready"})
        return JSONResponse(
            {"status": "loading" if not state["error"] else "failed", "error": state["error"]}, status_code=503
        )

    @app.get("/metrics")
    async def prometheus() -> Response:
        metrics.queue_depth.set(batcher.depth)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post(IMAGES_PATH, **IMAGES_ROUTE)
    async def images(request: HTTPRequest) -> Response:
        """Generate images. `Accept: image/png` answers the first image as a PNG; otherwise JSON."""
        req = await read_images_request(request, settings)
        if isinstance(req, Response):
            return req
        try:
            model = service.model(req.model)
            gen = await service.resolve(to_request(req), model)
            result = await service.run(request, gen, model)
        except BadInput as e:  # to_request: base64 that is not
            return _error(422, str(e), _field_of(e))
        except Refusal as e:
            return _error(e.status, e.message, e.field, e.headers)
        return images_response(request, gen, result, {})

    @app.get("/v1/bundles")
    async def bundles() -> dict:
        """The served bundles with what a request may send them and what it gets when it leaves a field out."""
        return {
            "default": service.current,
            "bundles": [bundle_info(m, service.pool.loaded(m.name) is not None) for m in service.pool.models.values()],
        }

    @app.get("/v1/progress")
    async def progress(preview: bool = True) -> dict:
        """The running engine call: steps done of total, seconds left, requests waiting, and a preview (PNG data
        URL) of the sample the UNet saw last."""
        snap = batcher.progress.snapshot(with_latents=preview)
        image = None
        if snap.latents is not None:
            image = "data:image/png;base64," + base64.b64encode(preview_png(snap.latents)).decode("ascii")
        return {
            "running": snap.running,
            "step": snap.step,
            "total": snap.total,
            "progress": snap.fraction,
            "eta_s": round(snap.eta, 3),
            "queued": batcher.depth,
            "preview": image,
        }

    @app.post("/v1/interrupt")
    async def interrupt() -> dict:
        """Stop the running engine call at its next step; its requests end with 409."""
        return {"interrupted": batcher.progress.interrupt()}

    from diffrt.serve import a1111_api, openai_api, page

    openai_api.add_routes(app, service)
    a1111_api.add_routes(app, service)
    page.add_routes(app)
    return app


def bundle_info(model: Model, loaded: bool) -> dict[str, Any]:
    m = model.manifest
    lo, hi = size_range(m)
    return {
        "name": model.name,
        "title": model.title,
        "family": m.model.family,
        "loaded": loaded,
        "width": m.model.default_size,
        "height": m.model.default_size,
        "min_size": lo,
        "max_size": hi,
        "size_multiple": size_multiple(m),
        "max_images": m.components["vae_decoder"].spec.dim_ranges["batch"].max,
        **bundle_defaults(m),
        "samplers": list(SAMPLERS),
        "image_to_image": "vae_encoder" in m.components,
        "inpainting_unet": m.inpainting_unet,  # needs image and mask_image
        "upscaler": "upscaler" in m.components,
    }
