"""`diffrt serve BUNDLE --ray`: the same HTTP API as a Ray Serve deployment, one replica per GPU.

This module imports ray at the top: only `--ray` (or a Ray Serve config naming `build_app`) imports it, so the
single-process server never needs Ray. What is shared with `diffrt.serve.app`: the request schema and its
validation, the error shapes, the PNG/JSON answers and the request-id/metrics middleware. What differs:

- Batching: `@serve.batch` gathers up to `max_batch` images per replica within `batch_wait_ms`; the batch is
  then split into compatible groups by the same rule as the in-process queue (`compatible_groups`), one
  pipeline call each, on the replica's engine thread.
- Back-pressure: Ray's router admits `max_ongoing_requests` per replica and queues `max_queued_requests` more
  per proxy; beyond that Ray answers 429 with Retry-After itself (`BackpressureConfig`), before any replica.
- Readiness: a replica loads the bundle and generates a warm-up image in its constructor; Ray routes to it
  only after that, so a replica that answers is ready.
"""

import asyncio
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import ray
from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from ray import serve
from ray.serve.config import BackpressureConfig

from diffrt.engine.request import Request
from diffrt.errors import BadInput
from diffrt.serve.app import (
    IMAGES_PATH,
    IMAGES_ROUTE,
    Metrics,
    RequestIdAndMetrics,
    ServeSettings,
    _error,
    engine_error,
    images_response,
    read_images_request,
    resolve_request,
)
from diffrt.serve.batcher import Batcher, JobResult, compatible_groups

log = logging.getLogger(__name__)

APP_NAME = "diffrt"


@dataclass
class RayOptions:
    """How the deployment is placed and scaled. Requests and batching are set by ServeSettings, as without Ray."""

    replicas: int = 1  # fixed count; with min/max replicas set: the initial count
    gpus_per_replica: float | None = None  # None: 0 for backend ort-cpu, else 1 (one replica per GPU)
    cpus_per_replica: float = 1.0
    min_replicas: int | None = None  # either bound set -> autoscaling
    max_replicas: int | None = None
    max_ongoing: int = 0  # requests a replica holds at once (0: twice max_batch, one batch running, one forming)
    retry_after_s: float = 1.0  # Retry-After on Ray's 429s
    address: str | None = None  # join this cluster instead of starting a local one
    tmp_dir: str | None = None  # the local cluster's temporary files (sockets, logs); None: Ray's default


# --- one replica ---------------------------------------------------------------------------------------------

_metrics: Metrics | None = None


def replica_metrics() -> Metrics:
    """This process's metrics. Each replica is a process of its own, so /metrics describes one replica."""
    global _metrics
    if _metrics is None:
        _metrics = Metrics()
    return _metrics


@dataclass(frozen=True)
class Work:
    """One request for the batch queue. `weight` is its images, at most max_batch, so that a request bigger than
    max_batch (allowed: the bundle decides) still forms a batch, alone, instead of being refused by Ray."""

    settings: Request  # resolved
    weight: int


def _images_in(batch: list[Work]) -> int:
    return sum(w.weight for w in batch)


api = FastAPI(title="diffrt", summary="Stable Diffusion images from a diffrt bundle (Ray Serve)")
api.add_middleware(RequestIdAndMetrics, metrics=replica_metrics, echo_id=False)


@serve.deployment(name="DiffrtReplica")
@serve.ingress(api)
class DiffrtReplica:
    async def __init__(self, settings: ServeSettings):
        from diffrt.engine.pipeline import Pipeline

        self.settings, self.metrics = settings, replica_metrics()
        # Only the batcher's engine thread and run_group are used: Ray's router and @serve.batch do the queueing.
        self.batcher = Batcher(settings.max_batch, settings.batch_wait_ms / 1000, settings.max_queue, self.metrics)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        t0 = time.perf_counter()
        # Loading and warm-up run on the engine thread, like every generation after them.
        pipe = await self.batcher.run_in_engine(
            lambda: Pipeline.load(
                settings.bundle,
                backend=settings.backend,
                threads=settings.threads,
                refiner=settings.refiner,
                embeddings=settings.embeddings,
                allow_pickle=settings.allow_pickle,
                lora_dir=settings.lora_dir,
                lora_paths=False,
            )
        )
        self.batcher.set_pipeline(pipe)  # caps max_batch at the bundle's images per call
        await self.batcher.run_in_engine(pipe.warm_up)
        self.generate.set_max_batch_size(self.batcher.max_batch)
        self.generate.set_batch_wait_timeout_s(settings.batch_wait_ms / 1000)
        self.metrics.ready.set(1)
        log.info(
            "replica %s ready in %.1f s (max batch %d images)",
            self.replica_id,
            time.perf_counter() - t0,
            self.batcher.max_batch,
        )

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self) -> dict:
        # Ray sends requests to a replica only once its constructor (load and warm-up) has returned.
        return {"status": "ready", "replica": self.replica_id}

    @api.get("/metrics")
    async def prometheus(self) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @api.post(IMAGES_PATH, **IMAGES_ROUTE)
    async def images(self, request: HTTPRequest) -> Response:
        """Generate images. `Accept: image/png` answers the first image as a PNG; otherwise JSON."""
        req = await read_images_request(request, self.settings)
        if isinstance(req, Response):
            return req
        gen = await resolve_request(req, self.batcher.pipeline)
        if isinstance(gen, Response):
            return gen
        try:
            result = await asyncio.wait_for(
                self.generate(Work(gen, min(gen.num_images, self.batcher.max_batch))), self.settings.timeout_s
            )
            if isinstance(result, BaseException):
                raise result
        except asyncio.TimeoutError:
            return _error(504, f"not finished within {self.settings.timeout_s:g} s")
        except Exception as e:  # noqa: BLE001 - BadInput, or the engine failed (NonFiniteOutput, backend errors)
            return engine_error(request, e)
        return images_response(request, gen, result, {"X-Replica-ID": self.replica_id})

    # Placeholder sizes: the constructor sets the real ones once the bundle's limits are known.
    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01, batch_size_fn=_images_in)
    async def generate(self, batch: list[Work]) -> list[JobResult | BaseException]:
        """Ray's batch may mix sizes and samplers: split it into compatible groups, one pipeline call each."""
        settings = [w.settings for w in batch]
        results: list[JobResult | BaseException | None] = [None] * len(batch)
        for group in compatible_groups(settings, self.batcher.max_batch):
            out = await self.batcher.run_in_engine(lambda g=group: self.batcher.run_group([settings[i] for i in g]))
            for i, r in zip(group, out):
                results[i] = r
        return results  # type: ignore[return-value]  # every index is in exactly one group


# --- the application -----------------------------------------------------------------------------------------


def deployment_options(settings: ServeSettings, opts: RayOptions) -> dict[str, Any]:
    """Ray Serve deployment options for these settings (also what a Serve config file may override)."""
    gpus = opts.gpus_per_replica
    if gpus is None:
        gpus = 0.0 if settings.backend == "ort-cpu" else 1.0
    out: dict[str, Any] = {
        # Ray hides the other GPUs from the replica (CUDA_VISIBLE_DEVICES): the pipeline uses "its" device 0.
        "ray_actor_options": {"num_cpus": opts.cpus_per_replica, "num_gpus": gpus},
        "max_ongoing_requests": opts.max_ongoing or 2 * settings.max_batch,
        "max_queued_requests": settings.max_queue,
        # Ray's default answer to a full queue is 503, which balancers read as "this backend is broken";
        # shedding load is a 429, as in the single-process server.
        "backpressure_config": BackpressureConfig(status_code=429, retry_after_s=opts.retry_after_s),
        # A bundle that fails to load fails the same way each time: do not retry it for minutes.
        "max_constructor_retry_count": 3,
    }
    if opts.min_replicas is None and opts.max_replicas is None:
        out["num_replicas"] = opts.replicas
    else:
        low = opts.min_replicas if opts.min_replicas is not None else 1
        high = opts.max_replicas if opts.max_replicas is not None else max(low, opts.replicas)
        out["num_replicas"] = "auto"
        out["autoscaling_config"] = {
            "min_replicas": low,
            "max_replicas": high,
            "initial_replicas": min(max(opts.replicas, low), high),
            # One full batch per replica: more waiting requests mean another replica would help.
            "target_ongoing_requests": settings.max_batch,
        }
    return out


def check(settings: ServeSettings, opts: RayOptions) -> None:
    """Refuse bad option combinations with one BadInput naming the option."""
    for name, value, low in (
        ("--replicas", opts.replicas, 1),
        ("--min-replicas", opts.min_replicas, 0),
        ("--max-replicas", opts.max_replicas, 1),
        ("--max-ongoing", opts.max_ongoing, 0),
    ):
        if value is not None and value < low:
            raise BadInput(f"{name} must be >= {low}, got {value}")
    if opts.min_replicas is not None and opts.max_replicas is not None and opts.min_replicas > opts.max_replicas:
        raise BadInput(f"--min-replicas {opts.min_replicas} is more than --max-replicas {opts.max_replicas}")
    if (opts.gpus_per_replica or 0) < 0 or opts.cpus_per_replica < 0:
        raise BadInput("--gpus-per-replica and --cpus-per-replica must be >= 0")
    if opts.max_ongoing and opts.max_ongoing < settings.max_batch:
        raise BadInput(
            f"--max-ongoing {opts.max_ongoing} is below --max-batch {settings.max_batch}: no batch could fill"
        )
    if opts.address and opts.tmp_dir:
        raise BadInput("--ray-tmp-dir applies to a local cluster; for --ray-address set it with `ray start --temp-dir`")


def build(settings: ServeSettings, opts: RayOptions) -> serve.Application:
    check(settings, opts)
    return DiffrtReplica.options(**deployment_options(settings, opts)).bind(settings)


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder for Serve config files (`serve run`, `serve deploy`, a KubeRay RayService):
    import_path `diffrt.serve.ray_app:build_app`, args: ServeSettings and RayOptions fields by name."""
    known = {f.name for f in fields(ServeSettings)}, {f.name for f in fields(RayOptions)} - {"address", "tmp_dir"}
    unknown = set(args) - known[0] - known[1]
    if unknown:
        raise BadInput(f"unknown args {sorted(unknown)}; known: {sorted(known[0] | known[1])}")
    settings = ServeSettings(**{k: v for k, v in args.items() if k in known[0]})
    return build(settings, RayOptions(**{k: v for k, v in args.items() if k in known[1]}))


# --- the driver --------------------------------------------------------------------------------------------


def start(settings: ServeSettings, opts: RayOptions, host: str, port: int) -> bool:
    """Connect to (or start) a Ray cluster and deploy; return True when this process started the cluster."""
    app = build(settings, opts)
    # Read by every Ray process this driver starts; a joined cluster follows its own `ray start` setting.
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    if opts.address:
        ray.init(address=opts.address, logging_level=logging.WARNING)
    else:
        try:
            # "local": always a cluster of our own, never one that `ray start` left running on this machine.
            ray.init(address="local", _temp_dir=opts.tmp_dir, include_dashboard=False, logging_level=logging.WARNING)
        except Exception:
            _kill_own_ray_processes()
            raise
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(app, name=APP_NAME, route_prefix="/")
    except BaseException:
        stop(owned=not opts.address)
        raise
    return not opts.address


def _kill_own_ray_processes() -> None:
    """A failed local start leaves the processes it had already started (GCS, monitor, dashboard, ...) with no
    handle to stop them, and this process would wait for them at exit: kill our own Ray descendants."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        try:
            # Field 4 of /proc/PID/stat is the parent; the name before it may contain spaces, hence rsplit on ")".
            parents[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (ValueError, OSError, IndexError):
            continue
    mine, todo = set(), [os.getpid()]
    while todo:
        parent = todo.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in mine:
                mine.add(pid)
                todo.append(pid)
    for pid in mine:
        try:
            if b"/ray/" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def stop(owned: bool) -> None:
    """Take the app down; stop Serve and the cluster only if this process started them."""
    try:
        if owned:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
    finally:
        ray.shutdown()


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def run(settings: ServeSettings, opts: RayOptions, host: str, port: int) -> int:
    """`diffrt serve --ray`: deploy, serve until SIGINT/SIGTERM, then shut down cleanly."""
    t0 = time.perf_counter()
    try:
        owned = start(settings, opts, host, port)
    except RuntimeError as e:  # Serve reports a failed deployment (e.g. the bundle did not load) this way
        raise BadInput(f"the Ray Serve deployment failed: {_first_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - Ray did not start: one line, the details are in Ray's logs
        raise BadInput(f"Ray did not start: {_first_line(e)}") from None
    log.info(
        "serving %s with Ray Serve on http://%s:%d (%.0f s to deploy)",
        settings.bundle,
        host,
        port,
        time.perf_counter() - t0,
    )
    done = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        while not done.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        log.info("shutting down")
        stop(owned)
    return 0
