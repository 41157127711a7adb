"""The graph cache: a component exported before from the same weights and settings gets its graphs back, byte
for byte; any change that could change the graph is a new key; a damaged entry is exported again."""

import copy
import logging

import pytest
import torch

from diffrt.export import graph_cache
from diffrt.export.bundle_writer import ExportOptions, export_component
from diffrt.export.upscaler import load_upscaler
from diffrt.specs import upscaler_spec
from tests.builders.upscaler import build_compact


@pytest.fixture(scope="module")
def upscaler(tmp_path_factory):
    up = load_upscaler(build_compact(tmp_path_factory.mktemp("up") / "compact.safetensors"))
    return up.module, upscaler_spec(up.scale, tile=32, size_multiple=up.size_multiple)


def key(module, spec, **kw):
    args = {"opset": 18, "fp32_attention": False, "fp16": True} | kw
    return graph_cache.graph_key(module, spec, **args)


def test_key_follows_weights_structure_spec_and_settings(upscaler):
    module, spec = upscaler
    base = key(module, spec)
    assert key(copy.deepcopy(module), spec) == base  # same weights and structure in another object
    changed = copy.deepcopy(module)
    with torch.no_grad():
        next(changed.parameters()).view(-1)[0] += 1e-6
    assert key(changed, spec) != base
    strided = copy.deepcopy(module)
    conv = next(m for m in strided.modules() if isinstance(m, torch.nn.Conv2d))
    conv.padding = (0, 0)  # no weight changes, the graph does
    assert key(strided, spec) != base
    assert key(module, upscaler_spec(4, tile=64, size_multiple=1)) != base
    assert key(module, spec, opset=17) != base
    assert key(module, spec, fp16=False) != base


def test_second_export_reuses_the_graphs_and_a_damaged_entry_is_exported_again(upscaler, tmp_path, caplog):
    module, spec = upscaler
    opts = ExportOptions(graph_cache=tmp_path / "cache")
    first, second, third = (tmp_path / n for n in ("a", "b", "c"))
    caplog.set_level(logging.INFO)
    files, checks = export_component(module, spec, first, opts, fp32_attention=False)
    assert checks and all(c.passed for c in checks)
    assert not any("reused" in r.getMessage() for r in caplog.records)
    [entry] = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    caplog.clear()
    files_2, checks_2 = export_component(module, spec, second, opts, fp32_attention=False)
    assert files_2 == files and any("reused from the graph cache" in r.getMessage() for r in caplog.records)
    assert checks_2 and all(c.passed for c in checks_2)  # validated again: the cache is not trusted blindly
    for rel in files.values():
        assert (second / rel).read_bytes() == (first / rel).read_bytes()
        assert (second / rel).stat().st_ino != (entry / rel).stat().st_ino  # copies, never shared files
    with open(entry / files["fp16"], "r+b") as f:
        f.truncate(100)
    caplog.clear()
    export_component(module, spec, third, opts, fp32_attention=False)
    assert any("incomplete" in r.getMessage() for r in caplog.records)
    assert (third / files["fp16"]).read_bytes() == (first / files["fp16"]).read_bytes()


def test_an_unwritable_cache_is_a_warning_not_a_failed_export(upscaler, tmp_path, caplog):
    module, spec = upscaler
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    files, checks = export_component(module, spec, tmp_path / "b", ExportOptions(graph_cache=blocker / "x"),
                                     fp32_attention=False)  # fmt: skip
    assert all(c.passed for c in checks) and (tmp_path / "b" / files["fp32"]).is_file()
    assert any("could not write" in r.getMessage() for r in caplog.records)
