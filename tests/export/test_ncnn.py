"""Real-ESRGAN's ncnn models imported as PyTorch weights: spandrel recognises them, and a small interpreter of the
ncnn graph (run on the ncnn weights) agrees with the spandrel module built from the converted weights."""

from __future__ import annotations

import functools
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffrt.errors import BadInput
from diffrt.export.ncnn import Layer, convert_ncnn, load_ncnn_state_dict, ncnn_scale, ncnn_to_state_dict, read_ncnn

X4PLUS, ANIME6B, VIDEO = "REALESRGAN_X4PLUS_UP4X", "REALESRGAN_X4PLUSANIME_UP4X", "REALESRGAN_ANIMAVIDEOV3_UP{}X"


def _param(models: Path, name: str) -> Path:
    return models / f"{name}.param"


@functools.lru_cache(maxsize=2)  # x4plus's 33 MB .bin is read by two tests
def _layers(models: Path, name: str) -> list[Layer]:
    return read_ncnn(_param(models, name), models / f"{name}.bin")


def _describe(state: dict[str, torch.Tensor]):
    import spandrel

    return spandrel.ModelLoader().load_from_state_dict(state)


# --- a reference interpreter of the ncnn graph, written from ncnn's layer semantics, independent of the mapping ---


def _shuffle(x: torch.Tensor, r: int) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.reshape(b, c // (r * r), r, r, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // (r * r), h * r, w * r)


def _run_layer(layer: Layer, xs: list[torch.Tensor]) -> torch.Tensor:
    p, t = layer.params, layer.type
    if t == "Convolution":
        w = torch.from_numpy(layer.weights["weight"]).to(xs[0].dtype)
        b = torch.from_numpy(layer.weights["bias"]).to(xs[0].dtype)
        y = F.conv2d(xs[0], w, b, stride=p.get(3, 1), padding=p.get(4, 0), dilation=p.get(2, 1))
        act = p.get(9, 0)
        if act == 1:
            return y.clamp_min(0)
        if act == 2:
            return torch.where(y > 0, y, y * p[10][0])
        assert act == 0, f"activation {act}"
        return y
    if t == "PReLU":
        slope = torch.from_numpy(layer.weights["slope"]).to(xs[0].dtype).view(1, -1, 1, 1)
        return torch.where(xs[0] > 0, xs[0], xs[0] * slope)
    if t == "ReLU":
        return torch.where(xs[0] > 0, xs[0], xs[0] * p.get(0, 0.0))
    if t == "BinaryOp":
        assert p.get(0, 0) == 0 and not p.get(1, 0), "only tensor + tensor"
        return xs[0] + xs[1]
    if t == "Eltwise":
        assert p.get(0) == 1, "only sum"
        coeffs = p.get(1, [1.0] * len(xs))
        return sum(c * x for c, x in zip(coeffs, xs))
    if t == "Concat":
        return torch.cat(xs, dim=p.get(0, 0) + 1)  # ncnn's axis leaves out the batch
    if t == "PixelShuffle":
        assert p.get(1, 0) == 0, "only PyTorch's channel order"
        return _shuffle(xs[0], p[0])
    if t == "Interp":
        mode, s = p.get(0), p.get(1, 1.0)
        if mode == 1 and s == int(s):  # nearest, integer factor: each pixel repeated
            return xs[0].repeat_interleave(int(s), 2).repeat_interleave(int(s), 3)
        assert mode == 3, f"Interp mode {mode}"
        return F.interpolate(xs[0], scale_factor=s, mode="bicubic", align_corners=False)
    raise AssertionError(f"no reference for {t}")


def ncnn_reference(layers: list[Layer], image: torch.Tensor) -> dict[str, torch.Tensor]:
    blobs: dict[str, torch.Tensor] = {}
    for layer in layers:
        if layer.type == "Input":
            blobs[layer.outputs[0]] = image
            continue
        xs = [blobs[name] for name in layer.inputs]
        y = xs[0] if layer.type == "Split" else _run_layer(layer, xs)
        for name in layer.outputs:
            blobs[name] = y
    return blobs


def _network_output(layers: list[Layer], blobs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The x4 network's output: the graph's last blob, or what its trailing bicubic downscale reads."""
    last = layers[-1]
    if last.type == "Interp" and last.params.get(1, 1.0) < 1:
        return blobs[last.inputs[0]]
    return blobs[last.outputs[0]]


def _compare(layers: list[Layer], module: torch.nn.Module, size: int = 16) -> float:
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, size, size, generator=g)
    with torch.no_grad():
        ref = _network_output(layers, ncnn_reference(layers, image))
        out = module.eval()(image)
    assert out.shape == ref.shape
    err = (out - ref).abs().max().item()
    print(f"max abs error {err:.2e}")
    return err


@pytest.mark.parametrize("name,blocks", [(X4PLUS, 23), (ANIME6B, 6)])
def test_rrdb_imports_as_esrgan(models: Path, name: str, blocks: int) -> None:
    layers = _layers(models, name)
    assert ncnn_scale(layers) == (4, 1.0)
    desc = _describe(ncnn_to_state_dict(layers))
    assert (desc.architecture.id, desc.scale) == ("ESRGAN", 4)
    assert f"{blocks}nb" in desc.tags and "64nf" in desc.tags
    assert _compare(layers, desc.model) <= 1e-4


@pytest.mark.parametrize("up", [4, 2, 3])
def test_animevideov3_imports_as_compact(models: Path, up: int) -> None:
    name = VIDEO.format(up)
    layers = _layers(models, name)
    # UP2X / UP3X ship the same x4 weights followed by a bicubic 0.5 / 0.75 resize: the importable part is x4.
    assert ncnn_scale(layers) == (4, up / 4)
    desc = _describe(load_ncnn_state_dict(_param(models, name)))
    assert (desc.architecture.id, desc.scale) == ("Compact", 4)
    assert (desc.model.num_conv, desc.model.num_feat) == (16, 64)
    assert _compare(layers, desc.model, size=24) <= 1e-4


def test_converted_file_loads_through_upscaler(models: Path, tmp_path: Path) -> None:
    from diffrt.export.upscaler import load_upscaler

    out = convert_ncnn(_param(models, VIDEO.format(4)), tmp_path / "animevideov3.safetensors")
    loaded = load_upscaler(out)
    assert (loaded.architecture, loaded.scale) == ("Compact", 4)


def _synthetic_photo(seed: int, size: int = 64) -> np.ndarray:
    """A deterministic scene of overlapping flat shapes with hard edges, drawn at 4x and box-filtered (the
    anti-aliased edges a camera records). Shapes are large so the 4x-smaller input still holds them."""
    from PIL import Image, ImageDraw

    big = size * 4
    img = Image.new("RGB", (big, big), (200, 190, 170))
    d = ImageDraw.Draw(img)
    rng = np.random.default_rng(seed)
    for _ in range(6):
        x0, y0 = (int(v) for v in rng.integers(-big // 4, big * 3 // 4, 2))
        w, h = (int(v) for v in rng.integers(big // 4, big * 3 // 4, 2))
        color = tuple(int(c) for c in rng.integers(0, 255, 3))
        box = [x0, y0, x0 + w, y0 + h]
        shape = rng.integers(0, 3)
        if shape == 0:
            d.rectangle(box, fill=color)
        elif shape == 1:
            d.ellipse(box, fill=color)
        else:
            d.polygon([(x0, y0 + h), (x0 + w // 2, y0), (x0 + w, y0 + h)], fill=color)
    return np.asarray(img.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255


def _grad_corr(a: np.ndarray, b: np.ndarray) -> float:
    def mag(x: np.ndarray) -> np.ndarray:
        g = x.mean(axis=2)
        return np.hypot(np.diff(g, axis=0)[:, :-1], np.diff(g, axis=1)[:-1, :]).ravel()

    return float(np.corrcoef(mag(a), mag(b))[0, 1])


def test_x4plus_beats_bicubic_on_edges(models: Path) -> None:
    """x4plus is a GAN model trained on degraded inputs: it trades PSNR for sharp edges, so the measure is how well
    the gradient magnitude (where the edges are, how strong) correlates with the original's."""
    from PIL import Image

    model = _describe(ncnn_to_state_dict(_layers(models, X4PLUS))).model.eval()
    for seed in range(3):
        hr = _synthetic_photo(seed)
        lr = Image.fromarray((hr * 255).round().astype(np.uint8)).resize((16, 16), Image.Resampling.BICUBIC)
        bicubic = np.asarray(lr.resize((64, 64), Image.Resampling.BICUBIC), dtype=np.float32) / 255
        x = torch.from_numpy(np.asarray(lr, dtype=np.float32) / 255).permute(2, 0, 1)[None]
        with torch.no_grad():
            sr = model(x)[0].clamp(0, 1).permute(1, 2, 0).numpy()
        assert sr.shape == hr.shape
        assert _grad_corr(sr, hr) > _grad_corr(bicubic, hr) + 0.05, f"scene {seed}"


# --- malformed and unsupported files: one-line BadInput, no traceback from numpy ---


def _write(tmp_path: Path, param: str, blob: bytes) -> tuple[Path, Path]:
    (tmp_path / "m.param").write_text(param)
    (tmp_path / "m.bin").write_bytes(blob)
    return tmp_path / "m.param", tmp_path / "m.bin"


CONV = "7767517\n2 2\nInput in 0 1 data\nConvolution c 1 1 data out 0=1 1=1 5=1 6=3\n"


def test_reads_fp32_and_fp16_blobs(tmp_path: Path) -> None:
    w = np.array([1.5, -2.0, 0.25], dtype=np.float32)
    layers = read_ncnn(*_write(tmp_path, CONV, struct.pack("<I", 0) + w.tobytes() + struct.pack("<f", 0.5)))
    assert layers[1].weights["weight"].ravel().tolist() == w.tolist() and layers[1].weights["bias"][0] == 0.5
    fp16 = struct.pack("<I", 0x01306B47) + w.astype(np.float16).tobytes() + b"\0\0"  # padded to 4 bytes
    layers = read_ncnn(*_write(tmp_path, CONV, fp16 + struct.pack("<f", 0.5)))
    assert layers[1].weights["weight"].ravel().tolist() == w.tolist()


@pytest.mark.parametrize(
    "param,blob,match",
    [
        (CONV, struct.pack("<I", 0x000D4B38) + b"\1\2\3\0" + bytes(4), "int8"),
        (CONV, struct.pack("<I", 0x00000101) + bytes(1024 + 4 + 4), "quantised"),
        (CONV, struct.pack("<I", 0) + bytes(8), "ends inside"),
        (CONV, struct.pack("<I", 0) + bytes(20), "left over"),
        (CONV.replace("7767517", "1234"), b"", "magic"),
        (CONV.replace("Convolution", "InnerProduct"), b"", "InnerProduct is not supported"),
        (CONV.replace("6=3", "6=x"), b"", "not a number"),
        (CONV.replace("2 2", "3 2"), b"", "declares 3 layers"),
    ],
)
def test_malformed_files_are_refused(tmp_path: Path, param: str, blob: bytes, match: str) -> None:
    with pytest.raises(BadInput, match=match) as e:
        read_ncnn(*_write(tmp_path, param, blob))
    assert "\n" not in str(e.value)


def test_missing_bin_is_refused(tmp_path: Path) -> None:
    (tmp_path / "m.param").write_text(CONV)
    with pytest.raises(BadInput, match="does not exist"):
        load_ncnn_state_dict(tmp_path / "m.param")


def test_export_takes_an_ncnn_param_as_the_upscaler(models: Path, tmp_path: Path) -> None:
    """`diffrt export --upscaler X.param`: the real animevideov3 weights exported and validated at two shapes."""
    from diffrt.export.bundle_writer import ExportOptions, export_component
    from diffrt.export.upscaler import load_upscaler
    from diffrt.specs import upscaler_spec

    up = load_upscaler(_param(models, "REALESRGAN_ANIMAVIDEOV3_UP4X"))
    assert (up.architecture, up.scale) == ("Compact", 4)
    spec = upscaler_spec(up.scale, tile=32, size_multiple=up.size_multiple)
    _, checks = export_component(up.module, spec, tmp_path, ExportOptions(), fp32_attention=False)
    assert len(checks) == 4 and all(c.passed for c in checks), checks
