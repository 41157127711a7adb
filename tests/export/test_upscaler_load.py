"""Upscaler loading: both ESRGAN key layouts and Compact, a restricted unpickler, clear refusals."""

import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from diffrt.errors import BadInput, UnsupportedModel
from diffrt.export.upscaler import load_upscaler
from tests.builders.upscaler import build_compact, build_esrgan_new, build_esrgan_old, esrgan_old_state


def test_both_esrgan_layouts_load_to_the_same_network(tmp_path):
    old = load_upscaler(build_esrgan_old(tmp_path / "old.pth", seed=3))
    new = load_upscaler(build_esrgan_new(tmp_path / "new.safetensors", seed=3))
    wrapped = load_upscaler(build_esrgan_new(tmp_path / "new.pth", seed=3))
    x = torch.rand(1, 3, 12, 20)
    for up in (old, new, wrapped):
        assert (up.architecture, up.scale, up.size_multiple) == ("ESRGAN", 4, 1)
    with torch.no_grad():
        a, b, c = old.module(x), new.module(x), wrapped.module(x)
    assert a.shape == (1, 3, 48, 80)
    assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("scale", [2, 4])
def test_compact_loads_with_its_scale(tmp_path, scale):
    up = load_upscaler(build_compact(tmp_path / "c.safetensors", scale=scale))
    assert up.architecture == "Compact" and up.scale == scale


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    Exploit.marker = marker
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model.0.weight": Exploit()}, f)
    with pytest.raises(BadInput, match="refused"):
        load_upscaler(path)
    assert not marker.exists()


def test_other_architectures_are_named_and_refused(tmp_path):
    from spandrel.architectures.SPAN import SPAN

    path = tmp_path / "span.safetensors"
    save_file(SPAN(num_in_ch=3, num_out_ch=3, feature_channels=8, upscale=2).state_dict(), str(path))
    with pytest.raises(UnsupportedModel, match="SPAN.*not supported"):
        load_upscaler(path)


@pytest.mark.parametrize("kind", ["random", "truncated", "missing", "not_tensors", "unknown_suffix"])
def test_bad_files_give_one_line_bad_input(tmp_path, kind):
    path = tmp_path / "u.pth"
    if kind == "random":
        path.write_bytes(os.urandom(2048))
    elif kind == "truncated":
        torch.save(esrgan_old_state(), path)
        path.write_bytes(path.read_bytes()[:3000])
    elif kind == "not_tensors":
        torch.save({"a": 1}, path)
    elif kind == "unknown_suffix":
        path = tmp_path / "u.onnx"
        path.write_bytes(b"x")
    with pytest.raises(BadInput) as err:
        load_upscaler(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_unrecognised_weights(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"encoder.layer.weight": torch.randn(4, 4)}, str(path))
    with pytest.raises(BadInput, match="does not recognise"):
        load_upscaler(path)
