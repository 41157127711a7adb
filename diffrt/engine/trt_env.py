"""What TensorRT needs from this machine: the tensorrt and cuda-python modules, a GPU, and their versions.

Shared by the runtime (trt.py) and the builder (trt_build.py); imports without TensorRT or a GPU."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from diffrt.errors import BadInput

try:
    from cuda.bindings import runtime as cudart
except ImportError:  # cuda-python is optional: only the TensorRT backend needs it
    cudart = None

INSTALL_HINT = "install it with `pip install --extra-index-url https://pypi.nvidia.com tensorrt-cu13`"
CUDA_HINT = "pip install 'cuda-bindings>=13'"


@dataclass(frozen=True)
class Environment:
    tensorrt: str  # TensorRT version: a plan deserialises only under the version that built it
    gpu: str  # GPU name, e.g. "NVIDIA H100 80GB HBM3": tactics are timed on this exact part
    compute_capability: str  # e.g. "9.0": kernels are compiled per SM architecture


def import_tensorrt():
    try:
        import tensorrt as trt
    except Exception as e:  # the PyPI placeholder raises on import; a missing shared library is an OSError
        raise BadInput(f"TensorRT is not importable ({type(e).__name__}: {e}); {INSTALL_HINT}") from None
    return trt


def error_name(err) -> str:
    return cudart.cudaGetErrorName(err)[1].decode()


def available_reason() -> str | None:
    """None when TensorRT, cuda-python and a GPU are usable, else one line saying what is missing."""
    missing = []
    try:
        import_tensorrt()
    except BadInput as e:
        missing.append(str(e))
    if cudart is None:
        missing.append(f"cuda-python is not installed (`{CUDA_HINT}`)")
    else:
        err, count = cudart.cudaGetDeviceCount()
        if err != cudart.cudaError_t.cudaSuccess or count == 0:
            why = error_name(err) if err != cudart.cudaError_t.cudaSuccess else "no devices"
            missing.append(f"no usable NVIDIA GPU ({why})")
    return "; ".join(missing) or None


def current_environment() -> Environment:
    """TensorRT version and the current GPU's name and compute capability."""
    trt = import_tensorrt()
    if cudart is None:
        raise BadInput(f"TensorRT needs cuda-python: `{CUDA_HINT}`")
    err, device = cudart.cudaGetDevice()
    if err == cudart.cudaError_t.cudaSuccess:
        err, prop = cudart.cudaGetDeviceProperties(device)
    if err != cudart.cudaError_t.cudaSuccess:
        raise BadInput(f"no usable NVIDIA GPU ({error_name(err)}); TensorRT needs one")
    gpu = prop.name.split(b"\0")[0].decode(errors="replace")
    return Environment(trt.__version__, gpu, f"{prop.major}.{prop.minor}")


def trt_logger():
    """A TensorRT logger that writes into `logging` (TensorRT's INFO is build chatter: debug here)."""
    trt = import_tensorrt()
    levels = {
        trt.ILogger.Severity.INTERNAL_ERROR: logging.CRITICAL,
        trt.ILogger.Severity.ERROR: logging.ERROR,
        trt.ILogger.Severity.WARNING: logging.WARNING,
    }
    trt_log = logging.getLogger("diffrt.tensorrt")

    class Bridge(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):
            trt_log.log(levels.get(severity, logging.DEBUG), "%s", msg)

    return Bridge()
