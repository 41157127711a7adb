"""GPU tests (`pytest -m gpu`): the CUDA-graph machinery with a stand-in for the engine (CUDA + cuda-bindings
only), then TensorRT engines of the tiny bundle against ONNX Runtime (needs TensorRT too). Each test skips with a
reason naming what it leaves uncovered."""

from __future__ import annotations

import shutil

import numpy as np
import onnxruntime as ort
import pytest

from diffrt.bundle import load_manifest
from diffrt.engine.trt_env import available_reason

pytestmark = pytest.mark.gpu
COSINE = 0.999  # FP16 engine vs the FP32 graph on ONNX Runtime CPU, per output


def cuda_reason() -> str | None:
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        return "cuda-bindings is not installed"
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess or count == 0:
        return f"no CUDA GPU ({cudart.cudaGetErrorName(err)[1].decode()})"
    return None


# ---- CUDA graphs without TensorRT -------------------------------------------------------------------------


class StandIn:
    """Plays the engine: out = sample and ctx = encoder_hidden_states, as device-to-device copies on the stream."""

    def __init__(self, stream):
        self.stream, self.io, self.binds = stream, None, 0

    def bind(self, io) -> None:
        self.io, self.binds = io, self.binds + 1

    def enqueue(self, stream_handle: int) -> bool:
        from cuda.bindings import runtime as cudart

        from diffrt.engine.trt import _ok

        kind, io = cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice, self.io
        for src, dst in (("sample", "out"), ("encoder_hidden_states", "ctx")):
            _ok(cudart.cudaMemcpyAsync(io.device[dst], io.device[src], io.host[src].nbytes, kind, self.stream))
        return True


def make_io(batch: int, side: int):
    from diffrt.engine.trt import StagedIO

    f32 = np.dtype(np.float32)
    latent, text = (batch, 4, side, side), (batch, 7, 16)
    return StagedIO({"sample": (latent, f32), "encoder_hidden_states": (text, f32)},
                    {"out": (latent, f32), "ctx": (text, f32)})  # fmt: skip


def test_cuda_graph_replay_equals_plain_execution():
    reason = cuda_reason()
    if reason:
        pytest.skip(f"CUDA-graph machinery (pinned buffers, capture, replay, re-capture) not covered: {reason}")
    from cuda.bindings import runtime as cudart

    from diffrt.engine.trt import StepRunner, _ok

    stream = _ok(cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking))
    graphed, plain = StandIn(stream), StandIn(stream)
    g = StepRunner("stand-in", stream, graphed.enqueue, graphed.bind, True, ("encoder_hidden_states",))
    p = StepRunner("stand-in", stream, plain.enqueue, plain.bind, False, ("encoder_hidden_states",))
    rng = np.random.default_rng(0)
    ios = {shape: (make_io(*shape), make_io(*shape)) for shape in ((2, 8), (1, 16))}
    try:
        for shape in ((2, 8), (1, 16), (2, 8)):  # a shape change re-binds, warms up and re-captures
            io_g, io_p = ios[shape]
            context = rng.standard_normal((shape[0], 7, 16), dtype=np.float32)
            kept = None
            for step in range(5):
                if step == 3:
                    context = context + 1  # a new generation: the steady input changes under a live graph
                feeds = {"sample": rng.standard_normal((shape[0], 4, shape[1], shape[1]), dtype=np.float32),
                         "encoder_hidden_states": context}  # fmt: skip
                out_g, out_p = g.run(io_g, feeds), p.run(io_p, feeds)
                assert (g.graph is not None) == (step >= 1), step  # captured after one warm-up call
                for k in out_g:
                    assert out_g[k].tobytes() == out_p[k].tobytes()
                np.testing.assert_array_equal(out_g["out"], feeds["sample"])
                np.testing.assert_array_equal(out_g["ctx"], context)
                if kept is not None:  # returned arrays are copies the next call does not overwrite
                    np.testing.assert_array_equal(kept[1], kept[0])
                kept = (feeds["sample"], out_g["out"])
        assert graphed.binds == 3 and g.graphs  # bound once per shape switch; no capture failure
    finally:
        g.invalidate()
        for pair in ios.values():
            for io in pair:
                io.free()
        cudart.cudaStreamDestroy(stream)


# ---- TensorRT engines -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trt_bundle(request, tmp_path_factory):
    reason = available_reason()
    if reason:
        pytest.skip(f"TensorRT engines (build, ORT parity, CUDA-graph replay, generate) not covered: {reason}")
    from diffrt.engine.trt_build import BuildOptions, build_bundle

    bundle = tmp_path_factory.mktemp("trt") / "sd1"
    # Plans are written into the bundle: work on a copy; the tiny export runs only when the test can.
    shutil.copytree(request.getfixturevalue("sd1_bundle"), bundle)
    build_bundle(bundle, BuildOptions())
    return bundle


def opt_feeds(spec, record):
    prof = record.profile(spec.name)
    dims = {d: n for t in spec.inputs for d, n in zip(t.shape, prof[t.name][1]) if isinstance(d, str)}
    return spec.sample_inputs(dims, seed=1)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def test_build_reuses_matching_plans(trt_bundle, caplog):
    from diffrt.engine.trt_build import BuildOptions, build_bundle

    with caplog.at_level("INFO", logger="diffrt.engine.trt_build"):
        build_bundle(trt_bundle, BuildOptions())
    assert "0 built" in caplog.text and "reusing plan" in caplog.text


def test_engines_match_onnxruntime(trt_bundle):
    from diffrt.engine.trt import TensorRTBackend

    manifest = load_manifest(trt_bundle)
    backend = TensorRTBackend(manifest)
    for name, entry in manifest.components.items():
        session = backend.load(entry.spec, trt_bundle / entry.files["fp16"])
        feeds = opt_feeds(entry.spec, session.record)
        ref = ort.InferenceSession(str(trt_bundle / entry.files["fp32"]), providers=["CPUExecutionProvider"])
        expected = dict(zip([t.name for t in entry.spec.outputs], ref.run(None, feeds)))
        got = session.run(feeds)
        for k, v in expected.items():
            assert got[k].shape == v.shape and got[k].dtype == v.dtype
            assert cosine(got[k], v) >= COSINE, (name, k, cosine(got[k], v))
        session.close()


def test_unet_graph_replay_equals_plain_enqueue(trt_bundle):
    from diffrt.engine.trt import TensorRTBackend

    manifest = load_manifest(trt_bundle)
    entry = manifest.components["unet"]
    session = TensorRTBackend(manifest).load(entry.spec, trt_bundle / entry.files["fp16"])
    feeds = opt_feeds(entry.spec, session.record)
    plain = session.run(feeds)["noise_pred"]  # warm-up: plain enqueue
    captured = session.run(feeds)["noise_pred"]  # capture, then launch
    replayed = session.run(feeds)["noise_pred"]
    assert session.runner.graph is not None, "the UNet call was not captured as a CUDA graph"
    assert plain.tobytes() == captured.tobytes() == replayed.tobytes()
    session.close()


def test_generate_on_tensorrt(trt_bundle):
    from diffrt import Pipeline

    kw = dict(num_inference_steps=4, seed=0, output_type="np", upscale=False)
    trt_image = Pipeline.load(trt_bundle, backend="tensorrt")("a red square", **kw).images[0]
    cpu_image = Pipeline.load(trt_bundle, backend="ort-cpu")("a red square", **kw).images[0]
    assert trt_image.shape == cpu_image.shape and np.isfinite(trt_image).all()
    assert np.abs(trt_image - cpu_image).mean() < 0.05  # FP16 engines vs the FP32 graphs after 4 steps
