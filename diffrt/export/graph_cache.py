"""Graphs exported before, reused: a component whose weights, structure, spec and tools are the same as an
earlier export's gets that export's ONNX files back instead of another trace (minutes for an SD 1.5 UNet).

Opt-in (`diffrt export --graph-cache DIR`, or DIFFRT_GRAPH_CACHE): the cache holds a full copy of each graph.
Useful when one checkpoint is exported several times, with another upscaler, image range or LoRA (only the
components that changed are traced again). The key hashes every parameter and buffer, each submodule's class
and public plain attributes (layer sizes, strides, eps, attention processor and implementation), the component
spec, the opset, the FP16 settings and the versions of diffrt and the export libraries; files are copied both
ways, so a bundle and the cache never share a file, and an entry whose files do not have their recorded sizes
is ignored."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

import torch

from diffrt import __version__
from diffrt.specs import ComponentSpec

log = logging.getLogger(__name__)
ENV = "DIFFRT_GRAPH_CACHE"
_PLAIN = (bool, int, float, str, type(None))
# Attributes that never reach the graph: where the checkpoint was read from, the default image size (a single
# file does not say it), the VAE's tile sizes (derived from it; the exporter never tiles). Private attributes
# (torch's and the libraries' bookkeeping) are left out too.
UNTRACED = frozenset({"name_or_path", "sample_size", "tile_sample_min_size", "tile_latent_min_size"})


def _plain(value) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_plain(v) for v in value)
    return isinstance(value, _PLAIN)


def graph_key(
    module: torch.nn.Module, spec: ComponentSpec, opset: int, fp32_attention: bool, fp16: bool, external: bool = False
) -> str:
    """Hex digest naming what the export of `module` to `spec` depends on."""
    h = hashlib.sha256()
    tools = {d: metadata.version(d) for d in ("torch", "onnx", "onnxscript", "diffusers", "transformers")
             if _installed(d)}  # fmt: skip
    head = {"diffrt": __version__, "tools": tools, "opset": opset, "fp32_attention": fp32_attention,
            "fp16": fp16, "external": external, "spec": spec.to_dict()}  # fmt: skip
    h.update(json.dumps(head, sort_keys=True).encode())
    for name, sub in module.named_modules():
        attrs = {k: v if _plain(v) else type(v).__qualname__
                 for k, v in sorted(vars(sub).items()) if not k.startswith("_") and k not in UNTRACED}  # fmt: skip
        attrs["attention"] = getattr(getattr(sub, "config", None), "_attn_implementation", None)  # transformers
        h.update(json.dumps([name, type(sub).__qualname__, attrs], sort_keys=True, default=str).encode())
    for name, tensor in module.state_dict(keep_vars=False).items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _installed(dist: str) -> bool:
    try:
        metadata.version(dist)
    except metadata.PackageNotFoundError:
        return False
    return True


def _component_files(folder: Path, name: str) -> list[Path]:
    """The files of component `name` under `folder`/onnx: its graphs and their external weights."""
    return sorted(p for p in (folder / "onnx").glob(f"{name}.*") if p.is_file())


def fetch(cache: Path, key: str, name: str, bundle: Path) -> bool:
    """Copy the cached files of `key` into `bundle`/onnx; False (and nothing copied) when there is no entry."""
    entry = cache / key
    try:
        sizes = json.loads((entry / "entry.json").read_text())["files"]
        sources = {f: entry / "onnx" / f for f in sizes}
        if not all(p.is_file() and p.stat().st_size == sizes[f] for f, p in sources.items()):
            log.warning("graph cache entry %s is incomplete: exporting %s again", entry, name)
            return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    (bundle / "onnx").mkdir(parents=True, exist_ok=True)
    for f, p in sources.items():
        shutil.copyfile(p, bundle / "onnx" / f)
    log.info("%s: graphs reused from the graph cache (%s)", name, entry)
    return True


def store(cache: Path, key: str, name: str, bundle: Path) -> None:
    """Copy component `name`'s files from `bundle` into the cache under `key`, atomically; a failure to
    write the cache (full disk, read-only) is a warning, never a failed export."""
    entry = cache / key
    if entry.exists():
        return
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key[:16]}.partial-", dir=cache))
        try:
            files = _component_files(bundle, name)
            (tmp / "onnx").mkdir()
            for p in files:
                shutil.copyfile(p, tmp / "onnx" / p.name)
            meta = {"component": name, "files": {p.name: p.stat().st_size for p in files}}
            (tmp / "entry.json").write_text(json.dumps(meta, indent=1))
            os.rename(tmp, entry)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        log.warning("could not write %s to the graph cache %s: %s", name, cache, e)
