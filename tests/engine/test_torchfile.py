"""Torch-saved files read without torch and without running their code (diffrt.engine.torchfile)."""

from __future__ import annotations

import collections
import io
import pickle
import zipfile

import numpy as np
import pytest
import torch

from diffrt.engine.torchfile import read_torch_file
from diffrt.errors import BadInput


def test_tensors_of_every_kind_come_back_as_torch_saved_them(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    saved = {
        "f32": torch.randn(3, 5),
        "f16": torch.randn(2, 7).half(),
        "bf16": torch.randn(4).bfloat16(),
        "view": base.t()[1:, 2:],  # a strided view with an offset into a shared storage
        "same": base,
        "long": torch.arange(5),
        "param": torch.nn.Parameter(torch.ones(2, 2)),
        "scalar": torch.tensor(2.5),
        "nested": {"state": collections.OrderedDict(w=torch.randn(3)), "name": "x", "step": 7},
    }
    path = tmp_path / "x.pt"
    torch.save(saved, path)
    got = read_torch_file(path, 1 << 20)
    for key in ("f32", "f16", "bf16", "view", "same", "long", "param", "scalar"):
        want = saved[key].detach().float().numpy()
        assert got[key].dtype == np.float32 and got[key].shape == want.shape
        np.testing.assert_array_equal(got[key], want)
    np.testing.assert_array_equal(got["nested"]["state"]["w"], saved["nested"]["state"]["w"].numpy())
    assert got["nested"]["name"] == "x" and got["nested"]["step"] == 7


class _Payload:
    def __reduce__(self):
        import os

        return (os.system, ("touch " + str(self.marker),))


def _zip_with(tmp_path, pkl: bytes, name="evil.pt"):
    path = tmp_path / name
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/version", "3\n")
    return path


def test_a_pickle_that_would_run_code_is_refused_before_anything_runs(tmp_path):
    payload = _Payload()
    payload.marker = tmp_path / "ran"
    path = _zip_with(tmp_path, pickle.dumps({"w": payload}, protocol=2))
    with pytest.raises(BadInput) as e:
        read_torch_file(path, 1 << 20)
    assert "posix.system" in str(e.value) or "os.system" in str(e.value)
    assert "\n" not in str(e.value) and not payload.marker.exists()


def test_old_format_broken_and_lying_files_are_one_line(tmp_path):
    old = tmp_path / "old.pt"
    torch.save({"w": torch.ones(2)}, old, _use_new_zipfile_serialization=False)
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(4)}, good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:-200])
    # a tensor that claims more elements than its storage holds
    buf = io.BytesIO()
    torch.save({"w": torch.ones(4)}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as z:
        members = {n: z.read(n) for n in z.namelist()}
    key = next(n for n in members if n.endswith("data/0"))
    members[key] = members[key][:8]
    short = tmp_path / "short.pt"
    with zipfile.ZipFile(short, "w") as z:
        for n, data in members.items():
            z.writestr(n, data)
    for path, words in ((old, "zip format"), (cut, "torch"), (short, "past the end")):
        with pytest.raises(BadInput) as e:
            read_torch_file(path, 1 << 20)
        assert path.name in str(e.value) and words in str(e.value) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(BadInput, match="more than"):
        read_torch_file(good, 100)
