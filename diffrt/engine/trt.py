"""TensorRT backend: plans from `diffrt build`, one shared activation buffer, pinned staging, CUDA graphs.

Per component: a plan whose key matches this GPU, TensorRT and ONNX graph -> pinned host + device buffers per
input shape -> run; the UNet call (H2D, enqueue, D2H) is one CUDA graph per (batch, height, width). CUDA via
cuda-python only; the module imports without TensorRT or a GPU (`available_reason` says what is missing)."""

from __future__ import annotations

import ctypes
import logging
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np

from diffrt.bundle import Manifest
from diffrt.engine import trt_build
from diffrt.engine.trt_env import available_reason, cudart, current_environment, error_name, import_tensorrt, trt_logger
from diffrt.errors import BadInput, DiffrtError
from diffrt.specs import ComponentSpec

log = logging.getLogger(__name__)
SIDES = {"latent_height": "--height", "latent_width": "--width"}  # latent dims -> the build flag in pixels
MAX_SHAPES = 8  # buffer sets kept per component; upscaler edge tiles bring a few extra shapes


class CudaError(DiffrtError):
    """A CUDA runtime call failed."""


def _ok(result, what: str = "", nbytes: int = 0):
    """Unwrap cuda-python's (error, *values) tuples; out-of-memory becomes a BadInput that says what to lower."""
    err, *values = result
    if err != cudart.cudaError_t.cudaSuccess:
        if err == cudart.cudaError_t.cudaErrorMemoryAllocation:
            raise BadInput(
                f"out of GPU memory allocating {nbytes / 2**20:.0f} MB for {what}; close other GPU processes, or "
                "use fewer images / smaller sizes with plans built for them (`diffrt build BUNDLE --batch N ...`)"
            )
        raise CudaError(f"CUDA error {error_name(err)}{' (' + what + ')' if what else ''}")
    return values[0] if len(values) == 1 else tuple(values) or None


class StagedIO:
    """Pinned host arrays and device buffers for one set of I/O shapes, at addresses fixed for CUDA graphs."""

    def __init__(self, inputs: dict[str, tuple[tuple, np.dtype]], outputs: dict[str, tuple[tuple, np.dtype]]):
        self.inputs, self.outputs = list(inputs), list(outputs)
        self.host, self.device, self._pinned = {}, {}, []  # name -> pinned array, name -> device pointer; pointers
        self.steady_loaded = False  # whether the device holds the steady inputs' current values
        try:
            for name, (shape, dtype) in {**inputs, **outputs}.items():
                count = int(np.prod(shape))
                nbytes = max(count, 1) * np.dtype(dtype).itemsize
                ptr = _ok(cudart.cudaMallocHost(nbytes), f"pinned {name}", nbytes)
                self._pinned.append(ptr)
                raw = np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(ptr))
                self.host[name] = raw.view(dtype)[:count].reshape(shape)
                self.device[name] = _ok(cudart.cudaMalloc(nbytes), name, nbytes)
        except BaseException:
            self.free()
            raise

    def upload(self, names: list[str], stream) -> None:
        kind = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        for n in names:
            _ok(cudart.cudaMemcpyAsync(self.device[n], self.host[n].ctypes.data, self.host[n].nbytes, kind, stream))

    def download(self, stream) -> None:
        kind = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for n in self.outputs:
            _ok(cudart.cudaMemcpyAsync(self.host[n].ctypes.data, self.device[n], self.host[n].nbytes, kind, stream))

    def free(self) -> None:
        for ptr in self.device.values():
            cudart.cudaFree(ptr)
        for ptr in self._pinned:
            cudart.cudaFreeHost(ptr)
        self.host, self.device, self._pinned = {}, {}, []


class StepRunner:
    """One component call: stage inputs -> (H2D -> enqueue -> D2H) -> sync -> copies of the outputs.

    With `graphs`, the bracketed part is captured as a CUDA graph once a plain call has run on the same
    buffers (TensorRT finishes shape-dependent setup in its first enqueue) and replayed after; a new buffer
    set (a new shape) drops the graph and starts over. A failed capture warns once and runs plainly from then.
    """

    def __init__(self, name: str, stream, enqueue: Callable[[int], bool], bind: Callable, graphs: bool, steady=()):
        self.name, self.stream, self.enqueue, self.bind = name, stream, enqueue, bind
        self.graphs, self.steady = graphs, frozenset(steady)  # steady: inputs uploaded only when they change
        self.graph = None  # cudaGraphExec_t for `bound`
        self.bound: StagedIO | None = None  # the buffer set the context's shapes and addresses point at
        self.warm = False  # a plain call has run on `bound`

    def invalidate(self) -> None:
        """Forget the graph and binding: shapes, addresses or activation memory changed."""
        if self.graph is not None:
            cudart.cudaGraphExecDestroy(self.graph)
        self.graph, self.bound, self.warm = None, None, False

    def run(self, io: StagedIO, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if io is not self.bound:
            self.invalidate()
            self.bind(io)
            self.bound = io
        step = [n for n in io.inputs if n not in self.steady]
        for n in step:
            np.copyto(io.host[n], feeds[n], casting="same_kind")
        self._refresh_steady(io, feeds)
        if self.graph is None and self.graphs and self.warm:
            self.graph = self._capture(io, step)
        if self.graph is not None:
            _ok(cudart.cudaGraphLaunch(self.graph, self.stream), f"{self.name} graph launch")
        else:
            self._body(io, step)
        _ok(cudart.cudaStreamSynchronize(self.stream), self.name)
        self.warm = True
        return {n: io.host[n].copy() for n in io.outputs}  # copies: the next call overwrites the pinned buffers

    def _refresh_steady(self, io: StagedIO, feeds: dict[str, np.ndarray]) -> None:
        # Text embeddings stay the same for every step of a generation: comparing values (12 us at 2x77x768 on
        # a CPU core) keeps them out of the graph and uploads them once, without trusting object identity.
        loaded = io.steady_loaded
        changed = [n for n in io.inputs if n in self.steady and not (loaded and np.array_equal(io.host[n], feeds[n]))]
        for n in changed:
            np.copyto(io.host[n], feeds[n], casting="same_kind")
        io.upload(changed, self.stream)  # same stream: ordered before the enqueue or graph launch
        io.steady_loaded = True

    def _body(self, io: StagedIO, step: list[str]) -> None:
        io.upload(step, self.stream)
        if not self.enqueue(int(self.stream)):
            raise DiffrtError(f"{self.name}: TensorRT enqueue failed (its error is logged above)")
        io.download(self.stream)

    def _capture(self, io: StagedIO, step: list[str]):
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal  # other threads may use CUDA
        failure = graph_exec = graph = None
        try:
            _ok(cudart.cudaStreamBeginCapture(self.stream, mode), "begin capture")
        except DiffrtError as e:
            failure = str(e)
        if failure is None:
            try:
                self._body(io, step)
            except DiffrtError as e:
                failure = str(e)
            err, graph = cudart.cudaStreamEndCapture(self.stream)
            if failure is None and err != cudart.cudaError_t.cudaSuccess:
                failure = error_name(err)
        if failure is None:
            err, graph_exec = cudart.cudaGraphInstantiate(graph, 0)
            failure = None if err == cudart.cudaError_t.cudaSuccess else error_name(err)
        if graph is not None and int(graph):
            cudart.cudaGraphDestroy(graph)
        if failure is None:
            return graph_exec
        cudart.cudaGetLastError()  # clear the capture error so plain enqueues go on
        self.graphs = False
        log.warning("%s: CUDA graph capture failed (%s); running without CUDA graphs", self.name, failure)
        return None


class SharedActivations:
    """One activation buffer for all engines: they run one at a time on one stream, so the largest need does."""

    def __init__(self, stream):
        self.stream, self.ptr, self.size, self.generation = stream, 0, 0, 0
        self.contexts: list = []

    def attach(self, context, need: int, name: str) -> None:
        self.contexts.append(context)
        if need <= self.size:
            if self.ptr:  # an engine that needs no activation memory gets none
                context.set_device_memory(self.ptr, self.size)
            return
        _ok(cudart.cudaStreamSynchronize(self.stream))
        if self.ptr:
            _ok(cudart.cudaFree(self.ptr))  # before the new one: peak memory is what runs out
        self.ptr, self.size = 0, 0
        self.ptr = _ok(cudart.cudaMalloc(need), f"{name} activations (shared by all engines)", need)
        self.size, self.generation = need, self.generation + 1  # graphs captured before now are stale
        for context in self.contexts:
            context.set_device_memory(self.ptr, self.size)

    def detach(self, context) -> None:
        self.contexts = [c for c in self.contexts if c is not context]


def bundle_root(path: Path, rel: str) -> Path:
    """The bundle directory from a component's graph path and its manifest-relative name."""
    return Path(path).parents[len(Path(rel).parts) - 1]


def request_hint(bundle: Path, spec: ComponentSpec, shapes: dict[str, tuple], vae_scale_factor: int) -> str:
    """A `diffrt build` line covering the image size of a request that no plan covers."""
    dims = spec.dims_of(shapes)
    sides = [f" {flag} {dims[d] * vae_scale_factor}" for d, flag in SIDES.items() if d in dims]
    return f"diffrt build {bundle}" + "".join(sides) + (" --batch N" if "batch" in dims else "")


class TensorRTSession:
    """One component on one plan at a time; a request outside that plan's profile switches to a plan that fits."""

    def __init__(self, backend: TensorRTBackend, spec: ComponentSpec, plans: list[trt_build.PlanRecord], bundle: Path):
        self.backend, self.spec, self.plans, self.bundle = backend, spec, plans, bundle
        self.record: trt_build.PlanRecord | None = None
        self.engine = self.context = self.runner = None
        self.buffers: OrderedDict[tuple, StagedIO] = OrderedDict()  # input shapes -> buffers, least recent first
        self._load(self._default_plan())

    def _default_plan(self) -> trt_build.PlanRecord:
        """The plan for the usual request (native size, one image, guidance), else the newest usable one."""
        try:
            usual = trt_build.profile_shapes(self.spec, trt_build.BuildOptions(), self.backend.manifest.model)
        except BadInput:  # a bundle whose native size its own specs reject: any usable plan will do
            return self.plans[0]
        return trt_build.choose_plan(self.plans, self.spec.name, {n: s[1] for n, s in usual.items()}) or self.plans[0]

    def _load(self, record: trt_build.PlanRecord) -> None:
        trt, name = import_tensorrt(), self.spec.name
        self.close()
        path, rebuild = record.plan(name), trt_build.build_command(self.bundle, record.options)
        engine = self.backend.trt_runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise BadInput(
                f"{name}: TensorRT could not load {path} (made by another TensorRT version or GPU, or the "
                f"GPU is out of memory: see the log); rebuild with `{rebuild}`"
            )
        names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        if names != {t.name for t in self.spec.inputs + self.spec.outputs}:
            raise BadInput(f"{name}: {path} has tensors {sorted(names)}, not the bundle's; rebuild with `{rebuild}`")
        context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if context is None:
            raise BadInput(
                f"{name}: TensorRT could not create an execution context (out of GPU memory?); close "
                "other GPU processes or build smaller plans"
            )
        self.backend.activations.attach(context, engine.device_memory_size_v2, name)
        self.dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        self.engine, self.context, self.record = engine, context, record
        self.generation = self.backend.activations.generation
        enqueue, steady = context.execute_async_v3, [t.name for t in self.spec.inputs if t.steady]
        self.runner = StepRunner(name, self.backend.stream, enqueue, self._bind, self.spec.per_step, steady)
        log.info("%s: TensorRT plan %s", name, path.relative_to(self.bundle))

    def _bind(self, io: StagedIO) -> None:
        """Point the context at one buffer set: shapes and addresses, once per shape change."""
        for n in io.inputs:
            if not self.context.set_input_shape(n, io.host[n].shape):
                raise BadInput(f"{self.spec.name}: {n} {io.host[n].shape} is outside the plan's profile")
        for n in io.inputs + io.outputs:
            self.context.set_tensor_address(n, io.device[n])

    def _buffers_for(self, shapes: dict[str, tuple]) -> StagedIO:
        key = tuple(shapes.values())
        if key in self.buffers:
            self.buffers.move_to_end(key)
            return self.buffers[key]
        self.runner.invalidate()  # the shapes set here move the context off the bound buffer set
        for n, shape in shapes.items():
            self.context.set_input_shape(n, shape)
        outputs = {
            t.name: (tuple(self.context.get_tensor_shape(t.name)), self.dtypes[t.name]) for t in self.spec.outputs
        }
        io = StagedIO({n: (s, self.dtypes[n]) for n, s in shapes.items()}, outputs)
        self.buffers[key] = io
        if len(self.buffers) > MAX_SHAPES:
            self.buffers.popitem(last=False)[1].free()
        return io

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        name = self.spec.name
        missing = [t.name for t in self.spec.inputs if t.name not in feeds]
        if missing:
            raise BadInput(f"{name}: missing inputs {missing}")
        shapes = {t.name: tuple(int(d) for d in np.shape(feeds[t.name])) for t in self.spec.inputs}
        if not trt_build.covers(self.record.profile(name), shapes):
            record = trt_build.choose_plan(self.plans, name, shapes)
            if record is None:
                hint = request_hint(self.bundle, self.spec, shapes, self.backend.manifest.model.vae_scale_factor)
                what = ", ".join(f"{n} {'x'.join(map(str, s))}" for n, s in shapes.items())
                raise BadInput(f"{name}: no TensorRT plan in {self.bundle}/trt covers {what}; build one with `{hint}`")
            self._load(record)
        if self.generation != self.backend.activations.generation:  # another engine grew the shared memory
            self.runner.invalidate()
            self.generation = self.backend.activations.generation
        out = self.runner.run(self._buffers_for(shapes), {n: np.asarray(feeds[n]) for n in shapes})
        return {t.name: out[t.name].astype(t.dtype, copy=False) for t in self.spec.outputs}

    def close(self) -> None:
        if self.runner is not None:
            self.runner.invalidate()
        for io in self.buffers.values():
            io.free()
        self.buffers.clear()
        if self.context is not None:
            self.backend.activations.detach(self.context)
        self.runner = self.context = None  # the context goes before its engine
        self.engine = self.record = None


class TensorRTBackend:
    """FP16 strongly typed TensorRT plans built by `diffrt build`, on one CUDA stream."""

    name, precision = "tensorrt", "fp16"
    # why requests with LoRAs are refused (the pipeline says it before the request runs)
    no_lora = ("LoRAs switched at run time need ONNX Runtime for now (refitting TensorRT plans is not built yet); "
               "use --backend ort-cuda or ort-cpu, or bake them in with diffrt export --lora")  # fmt: skip

    def __init__(self, manifest: Manifest):
        reason = available_reason()
        if reason:
            raise BadInput(f"backend tensorrt is unavailable: {reason}; or use --backend ort-cuda or ort-cpu")
        trt = import_tensorrt()
        self.manifest, self.env = manifest, current_environment()
        self.logger = trt_logger()  # TensorRT keeps a pointer to it: it must outlive the runtime
        self.trt_runtime = trt.Runtime(self.logger)
        self.stream = _ok(cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking), "stream")
        self.activations = SharedActivations(self.stream)

    def load(self, spec: ComponentSpec, path: Path, weights: dict | None = None) -> TensorRTSession:
        if weights:
            raise BadInput(self.no_lora)
        rel = self.manifest.components[spec.name].files.get("fp16")
        if rel is None:
            raise BadInput(f"{spec.name} has no FP16 graph, which TensorRT plans are built from; re-export the bundle")
        bundle = bundle_root(path, rel)
        plans = trt_build.select_plans(bundle, self.env, spec.name, trt_build.onnx_sha256(Path(path)))
        return TensorRTSession(self, spec, plans, bundle)
