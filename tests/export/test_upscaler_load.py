"""Upscaler loading: both ESRGAN key layouts and Compact, a restricted unpickler, clear refusals, exportability."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pickle  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from diffrt.errors import BadInput, UnsupportedModel  # noqa: E402
from diffrt.export.upscaler import load_upscaler  # noqa: E402
from tests.builders.upscaler import (  # noqa: E402
    build_compact,
    build_esrgan_new,
    build_esrgan_old,
    esrgan_old_state,
    onnx_session,
    to_basicsr_layout,
)


def export_check(module: torch.nn.Module, trace: tuple[int, int], sizes: list[tuple[int, int, int]]) -> float:
    """Export with dynamic batch/height/width (TorchScript exporter, opset 17) traced at `trace`; return the
    largest |onnxruntime - torch| over inputs of shape (batch, 3, h, w) for each (batch, h, w) in `sizes`."""
    session = onnx_session(module, trace)
    worst = 0.0
    for i, (b, h, w) in enumerate(sizes):
        x = torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(i))
        with torch.no_grad():
            want = module(x).numpy()
        got = session.run(None, {"image": x.numpy()})[0]
        assert got.shape == want.shape, (got.shape, want.shape)
        worst = max(worst, float(np.abs(got - want).max()))
    return worst


LAYOUTS = {  # file name -> (builder, scale, size multiple)
    "old-x4.pth": (lambda p: build_esrgan_old(p, 4, seed=1), 4, 1),
    "old-x2.pth": (lambda p: build_esrgan_old(p, 2, seed=1), 2, 1),
    "old-x1.pth": (lambda p: build_esrgan_old(p, 1, seed=1), 1, 1),
    "new-x4.safetensors": (lambda p: build_esrgan_new(p, 4, seed=1), 4, 1),
    "new-x4.pth": (lambda p: build_esrgan_new(p, 4, seed=1), 4, 1),
    "new-x2.safetensors": (lambda p: build_esrgan_new(p, 2, seed=1), 2, 4),  # pixel-unshuffle by 2
    "new-x1.pth": (lambda p: build_esrgan_new(p, 1, seed=1), 1, 4),  # pixel-unshuffle by 4
    "compact-x4.safetensors": (lambda p: build_compact(p, 4, seed=1), 4, 1),
    "compact-x2.safetensors": (lambda p: build_compact(p, 2, seed=1), 2, 1),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layouts_load_and_export_with_dynamic_height_and_width(tmp_path, name):
    build, scale, multiple = LAYOUTS[name]
    up = load_upscaler(build(tmp_path / name))
    arch = "Compact" if name.startswith("compact") else "ESRGAN"
    assert (up.architecture, up.scale, up.size_multiple) == (arch, scale, multiple)
    assert (up.in_channels, up.out_channels) == (3, 3)
    assert not up.module.training and not any(p.requires_grad for p in up.module.parameters())
    with torch.no_grad():
        out = up.module(torch.rand(2, 3, 12, 20))
    assert out.shape == (2, 3, 12 * scale, 20 * scale) and out.std() > 1e-3  # not a trivial network
    # Traced at one size, the graph must agree with torch at others: non-square, another batch (all sides
    # multiples of 4, the strictest size_multiple here).
    err = export_check(up.module, (16, 16), [(1, 20, 36), (2, 28, 12)])
    assert err <= 1e-4, err


def test_both_esrgan_layouts_load_to_the_same_network(tmp_path):
    old = load_upscaler(build_esrgan_old(tmp_path / "old.pth", seed=3))
    new = load_upscaler(build_esrgan_new(tmp_path / "new.safetensors", seed=3))
    wrapped = load_upscaler(build_esrgan_new(tmp_path / "new.pth", seed=3))
    x = torch.rand(1, 3, 12, 20)
    with torch.no_grad():
        a, b, c = old.module(x), new.module(x), wrapped.module(x)
    assert a.shape == (1, 3, 48, 80)
    assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("key", ["params_ema", "params", "state_dict", "model"])
def test_training_checkpoint_wrappers_are_unwrapped_by_the_restricted_loader(tmp_path, monkeypatch, key):
    path = tmp_path / "w.ckpt"
    torch.save({key: to_basicsr_layout(esrgan_old_state()), "epoch": 7}, path)
    calls, real_load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(kw) or real_load(*a, **kw))
    assert load_upscaler(path).scale == 4
    assert [kw.get("weights_only") for kw in calls] == [True]  # never the full unpickler


class Exploit:
    marker = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_pickle_that_would_run_code_is_refused(tmp_path, how):
    Exploit.marker = str(tmp_path / "pwned")
    path = tmp_path / "evil.pth"
    payload = {**esrgan_old_state(), "model.0.weight": Exploit()}
    if how == "torch.save":
        torch.save(payload, path)
    else:  # protocol 2, so the unpickler reaches the global (a newer protocol fails earlier, on its framing)
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(BadInput, match=r"posix\.system|nt\.system") as err:
        load_upscaler(path)
    assert "refuses" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "pwned").exists()


def test_other_architectures_are_named_and_refused(tmp_path):
    from spandrel.architectures.SPAN import SPAN

    path = tmp_path / "span.safetensors"
    save_file(SPAN(num_in_ch=3, num_out_ch=3, feature_channels=8, upscale=2).state_dict(), str(path))
    with pytest.raises(UnsupportedModel, match=r"SPAN.*not supported.*ESRGAN.*Compact"):
        load_upscaler(path)


def test_non_rgb_esrgan_is_refused(tmp_path):
    from spandrel.architectures.ESRGAN import ESRGAN

    path = tmp_path / "gray.safetensors"
    save_file(ESRGAN(in_nc=1, out_nc=1, num_filters=8, num_blocks=1).state_dict(), str(path))
    with pytest.raises(UnsupportedModel, match="1 to 1 channels"):
        load_upscaler(path)


@pytest.mark.parametrize(
    "kind",
    ["random", "random.safetensors", "truncated", "empty", "missing", "not_tensors", "unknown_suffix", "incomplete"],
)
def test_bad_files_give_one_line_bad_input(tmp_path, kind):
    path = tmp_path / ("u.safetensors" if kind.endswith(".safetensors") else "u.pth")
    if kind.startswith("random"):
        path.write_bytes(np.random.default_rng(0).bytes(2048))
    elif kind == "truncated":
        torch.save(esrgan_old_state(), path)
        path.write_bytes(path.read_bytes()[:3000])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "not_tensors":
        torch.save({"a": 1}, path)
    elif kind == "unknown_suffix":
        path = tmp_path / "u.onnx"
        path.write_bytes(b"x")
    elif kind == "incomplete":  # recognised as ESRGAN, but a layer is missing
        torch.save({k: v for k, v in esrgan_old_state().items() if "RDB2.conv3" not in k}, path)
    with pytest.raises(BadInput) as err:
        load_upscaler(path)
    assert not isinstance(err.value, UnsupportedModel)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_unrecognised_weights(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"encoder.layer.weight": torch.randn(4, 4)}, str(path))
    with pytest.raises(BadInput, match="does not recognise"):
        load_upscaler(path)
