"""Backends behind one narrow protocol: load a component, run it on named arrays.

The pipeline never asks which backend it talks to. A backend's `load` returns a Session whose `run` takes
and returns float32/int32 host arrays named as in the component spec.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort

from diffrt.bundle import Manifest
from diffrt.errors import BadInput
from diffrt.specs import ComponentSpec

log = logging.getLogger(__name__)
BACKENDS = ("auto", "tensorrt", "ort-cuda", "ort-cpu")


class Session(Protocol):
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class Backend(Protocol):
    name: str
    precision: str  # which ONNX files it reads: "fp32" or "fp16"

    def load(self, spec: ComponentSpec, path: Path, weights: dict[str, np.ndarray] | None = None) -> Session:
        """A session of the graph at `path`; `weights` replace initializers held in its external data (LoRAs)."""
        ...


class OrtSession:
    """An ONNX Runtime session that returns outputs by name."""

    def __init__(self, sess: ort.InferenceSession, spec: ComponentSpec, keep=None):
        self.sess = sess
        self.outputs = [t.name for t in spec.outputs]
        self.keep = keep  # replacement weights: ORT reads them from this memory for the session's life

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.outputs, self.sess.run(self.outputs, feeds)))


class OrtCpuBackend:
    """ONNX Runtime on the CPU, FP32 graphs (CPU FP16 kernels are few; ORT would cast back and forth)."""

    name, precision = "ort-cpu", "fp32"

    def __init__(self, threads: int = 0):
        self.threads = threads or int(os.environ.get("DIFFRT_THREADS", "0"))

    def options(self) -> ort.SessionOptions:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads:
            opts.intra_op_num_threads = self.threads
        return opts

    def load(self, spec: ComponentSpec, path: Path, weights: dict[str, np.ndarray] | None = None) -> Session:
        opts = self.options()
        keep = replace_weights(opts, weights)
        return OrtSession(ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]), spec, keep)


def replace_weights(opts: ort.SessionOptions, weights: dict[str, np.ndarray] | None) -> list | None:
    """Give a session replacement weights for initializers in external data. As external initializers they are
    in the graph before ONNX Runtime folds constants; `add_initializer` overrides are dropped where a weight is
    folded (a Linear weight's Transpose), silently. Returns what must outlive the session."""
    if not weights:
        return None
    values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(w)) for w in weights.values()]
    opts.add_external_initializers(list(weights), values)
    return values


class OrtCudaSession:
    """IO-bound CUDA session: inputs and outputs live on the GPU at fixed addresses per shape, so ORT can
    replay a captured CUDA graph (`enable_cuda_graph`) for every call of that shape."""

    def __init__(self, make_session, spec: ComponentSpec, cuda_graph: bool):
        self.make_session, self.spec, self.cuda_graph = make_session, spec, cuda_graph
        self.per_shape: dict[tuple, tuple] = {}  # input shapes -> (session, binding, inputs, outputs)

    def _prepare(self, feeds: dict[str, np.ndarray]):
        key = tuple((k, v.shape) for k, v in feeds.items())
        if key not in self.per_shape:
            # A CUDA graph is tied to one set of shapes and addresses: one session per shape when enabled.
            sess = (
                self.make_session(self.cuda_graph)
                if self.cuda_graph or not self.per_shape
                else (next(iter(self.per_shape.values()))[0])
            )
            binding = sess.io_binding()
            inputs = {k: ort.OrtValue.ortvalue_from_numpy(v, "cuda", 0) for k, v in feeds.items()}
            for k, v in inputs.items():
                binding.bind_ortvalue_input(k, v)
            outputs = {}
            dims = self.spec.dims_of({k: v.shape for k, v in feeds.items()})
            for t in self.spec.outputs:
                shape = self.spec.shape(t, dims)
                outputs[t.name] = ort.OrtValue.ortvalue_from_shape_and_type(shape, np.dtype(t.dtype), "cuda", 0)
                binding.bind_ortvalue_output(t.name, outputs[t.name])
            self.per_shape[key] = (sess, binding, inputs, outputs)
        return self.per_shape[key]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        sess, binding, inputs, outputs = self._prepare(feeds)
        for k, v in feeds.items():
            inputs[k].update_inplace(np.ascontiguousarray(v))
        sess.run_with_iobinding(binding)
        return {k: v.numpy() for k, v in outputs.items()}


class OrtCudaBackend:
    """ONNX Runtime's CUDA provider on the FP16 graphs, with IO binding and CUDA graphs for static shapes."""

    name, precision = "ort-cuda", "fp16"

    def __init__(self, cuda_graph: bool = True):
        self.cuda_graph = cuda_graph

    def load(self, spec: ComponentSpec, path: Path, weights: dict[str, np.ndarray] | None = None) -> Session:
        keep = []

        def make_session(cuda_graph: bool) -> ort.InferenceSession:
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            keep.append(replace_weights(opts, weights))
            provider = ("CUDAExecutionProvider", {"enable_cuda_graph": "1" if cuda_graph else "0"})
            return ort.InferenceSession(str(path), opts, providers=[provider])

        return OrtCudaSession(make_session, spec, self.cuda_graph)


def cuda_available() -> bool:
    return "CUDAExecutionProvider" in ort.get_available_providers()


def make_backend(name: str, manifest: Manifest, threads: int = 0, bundle: Path | None = None) -> Backend:
    """Resolve a backend name; "auto" takes the fastest one available and logs its choice."""
    if name not in BACKENDS:
        raise BadInput(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "auto":
        from diffrt.engine.trt_build import read_plan_records
        from diffrt.engine.trt_env import available_reason

        reason = available_reason()
        if reason is None and bundle is not None and not read_plan_records(bundle):
            reason = "the bundle has no TensorRT plans yet (`diffrt build`)"
        if reason is None:
            name = "tensorrt"
        elif cuda_available():
            name = "ort-cuda"
        else:
            name = "ort-cpu"
        log.info("backend auto: using %s%s", name, f" ({reason})" if name != "tensorrt" and reason else "")
    if name == "tensorrt":
        from diffrt.engine.trt import TensorRTBackend

        return TensorRTBackend(manifest)
    if name == "ort-cuda":
        if not cuda_available():
            raise BadInput(
                "backend ort-cuda needs onnxruntime-gpu and an NVIDIA GPU; install onnxruntime-gpu "
                "or use --backend ort-cpu"
            )
        return OrtCudaBackend()
    return OrtCpuBackend(threads)
