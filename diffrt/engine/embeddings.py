"""Textual inversion (Gal et al. 2022): learned token embeddings, loaded at run time from a folder and called
by name in a prompt, with no new export. The text encoder graphs take token embeddings (the bundle's table,
looked up in NumPy), so an embedding's vectors are extra rows after the table.

Layouts: A1111's `.safetensors` (`emb_params`, (n, D)), SDXL's (`clip_l` (n, 768) and `clip_g` (n, 1280)), and
diffusers' `learned_embeds.safetensors` (one tensor named after its token, (D,) or (n, D)). The file's stem is
the name a prompt uses, as in A1111. `.pt` / `.bin` files are pickles: refused unless `allow_pickle`, then read
by diffrt's tensor-only unpickler (diffrt.engine.torchfile: no torch, no code run). Files that do not fit the
bundle's text encoders are skipped with a warning, never an error: a folder shared between SD 1.5 and SDXL
models is the usual case.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffrt.engine.safetensors import load_pickle, read_safetensors
from diffrt.errors import BadInput

log = logging.getLogger(__name__)
MAX_FILE_BYTES = 16 << 20  # embeddings are kilobytes; a bigger file is not one
MAX_VECTORS = 75  # one prompt chunk; A1111's embeddings never come close
PICKLES = (".pt", ".bin")


@dataclass(frozen=True)
class Embedding:
    name: str  # the word that calls it in a prompt (the file's stem)
    vectors: tuple[np.ndarray, ...]  # one (n, D) float32 array per text encoder of the bundle, in their order


def load_embeddings(folder: str | Path, widths: list[int], allow_pickle: bool = False) -> dict[str, Embedding]:
    """The embeddings of `folder` that fit text encoders of these widths (SD: [768]; SDXL: [768, 1280]; the SDXL
    refiner: [1280]), by name. BadInput only when the folder itself is not there."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BadInput(f"embeddings folder {folder} does not exist; pass a folder of .safetensors embeddings")
    out: dict[str, Embedding] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() not in (".safetensors", *PICKLES):
            continue
        name = path.stem
        try:
            if name.lower() in (n.lower() for n in out):
                raise BadInput(f"another file is already called {name!r}")
            tensors = _read(path, allow_pickle)
            out[name] = Embedding(name, _vectors(tensors, widths))
        except BadInput as e:
            log.warning("embedding %s skipped: %s", path.name, e)
    if out:
        log.info("embeddings: %s", ", ".join(f"{e.name} ({len(e.vectors[0])})" for e in out.values()))
    return out


def _read(path: Path, allow_pickle: bool) -> dict[str, np.ndarray]:
    if path.suffix.lower() not in PICKLES:
        return read_safetensors(path, MAX_FILE_BYTES)
    if not allow_pickle:
        raise BadInput("a pickle (.pt/.bin) runs code when read; convert it to .safetensors or allow pickles")
    return load_pickle(path, MAX_FILE_BYTES, "an embedding")


def _vectors(tensors: dict[str, np.ndarray], widths: list[int]) -> tuple[np.ndarray, ...]:
    """One (n, D) array per encoder width, or BadInput saying why the file does not fit."""
    if "clip_l" in tensors or "clip_g" in tensors:  # SDXL: one set per encoder, by width
        by_width = {t.shape[-1]: t for t in (tensors.get("clip_l"), tensors.get("clip_g")) if t is not None}
    elif len(tensors) == 1 or "emb_params" in tensors:
        t = tensors.get("emb_params", next(iter(tensors.values())))
        by_width = {t.shape[-1]: t}
    else:
        raise BadInput(f"unknown layout (tensors {sorted(tensors)[:4]}); expected emb_params, clip_l/clip_g or one")
    got = sorted(by_width)
    if not all(w in by_width for w in widths):
        raise BadInput(f"made for text encoders {got} wide; this bundle's are {widths}")
    vectors = tuple(np.atleast_2d(by_width[w]).astype(np.float32) for w in widths)
    counts = {len(v) for v in vectors}
    if any(v.ndim != 2 for v in vectors) or len(counts) != 1 or not 1 <= counts.pop() <= MAX_VECTORS:
        raise BadInput(f"vectors of shapes {[v.shape for v in vectors]}: expected 1 to {MAX_VECTORS} per encoder")
    if not all(np.isfinite(v).all() for v in vectors):
        raise BadInput("holds NaN or infinite values")
    return vectors
