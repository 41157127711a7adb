"""Upscalers export to FP32/FP16 ONNX that validates against torch at two shapes."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from diffrt.bundle import load_manifest
from diffrt.export.bundle_writer import ExportOptions, export_component
from diffrt.export.fp16 import fp16_fraction
from diffrt.export.upscaler import load_upscaler
from diffrt.specs import upscaler_spec
from tests.builders.upscaler import build_compact, build_esrgan_new, build_esrgan_old

BUILDERS = {
    "esrgan-old.pth": build_esrgan_old,
    "esrgan-new.safetensors": build_esrgan_new,
    "compact.safetensors": build_compact,
}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_upscaler_exports_and_validates(name, tmp_path):
    up = load_upscaler(BUILDERS[name](tmp_path / name))
    spec = upscaler_spec(up.scale, tile=32, size_multiple=up.size_multiple)
    files, checks = export_component(up.module, spec, tmp_path, ExportOptions(), fp32_attention=False)
    assert {c.shape for c in checks} == {"batch=1 height=32 width=32", "batch=2 height=32 width=16"}
    assert all(c.passed for c in checks), checks
    for _precision, rel in files.items():
        onnx.checker.check_model(str(tmp_path / rel))
    assert fp16_fraction(onnx.load(str(tmp_path / files["fp16"]))) > 0.99  # Resize scales stay FP32 by spec
    # The graph takes any size in range, not only the traced one.
    sess = ort.InferenceSession(str(tmp_path / files["fp32"]), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"image": np.random.default_rng(0).random((1, 3, 24, 40), dtype=np.float32)})[0]
    assert out.shape == (1, 3, 24 * up.scale, 40 * up.scale)


def test_bundle_with_upscaler_records_it(sd1_upscaled_bundle):
    m = load_manifest(sd1_upscaled_bundle)
    assert m.upscaler.architecture == "ESRGAN" and m.upscaler.scale == 4
    assert set(m.components["upscaler"].files) == {"fp32", "fp16"}
    assert m.components["upscaler"].spec.dim_ranges["height"].opt == m.upscaler.tile
