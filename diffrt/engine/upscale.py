"""Tiled upscaling with feathered overlaps: any image size in bounded memory, without seams."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile origins along one axis: stride tile - overlap, the last tile shifted inward to end at the edge."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def ramp(length: int, overlap: int, at_start: bool, at_end: bool) -> np.ndarray:
    """1-D blend weights: rising over the overlap where a neighbour precedes, falling where one follows.
    Weights never reach 0, so every pixel keeps a positive total weight."""
    w = np.ones(length, np.float32)
    if overlap > 0:
        edge = (np.arange(overlap, dtype=np.float32) + 0.5) / overlap  # (0, 1), linear
        if not at_start:
            w[:overlap] = np.minimum(w[:overlap], edge)
        if not at_end:
            w[length - overlap :] = np.minimum(w[length - overlap :], edge[::-1])
    return w


def _pad_to_multiple(x: np.ndarray, multiple: int) -> np.ndarray:
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if ph or pw:
        x = np.pad(x, ((0, 0), (0, 0), (0, ph), (0, pw)), mode="reflect")
    return x


def upscale_tiled(
    run: Callable[[np.ndarray], np.ndarray],
    image: np.ndarray,
    scale: int,
    tile: int = 128,
    overlap: int = 16,
    size_multiple: int = 1,
) -> np.ndarray:
    """(B, 3, H, W) -> (B, 3, sH, sW) by running `run` on tiles of at most tile x tile input pixels.

    Neighbouring tiles share `overlap` input pixels; in the output they are blended with linear weights,
    so the convolution's edge effects near a tile border fade out instead of showing as a seam.
    """
    b, c, h, w = image.shape
    tile = max(tile // size_multiple * size_multiple, size_multiple)
    overlap = min(overlap, tile // 2)
    if h <= tile and w <= tile:  # one call; pad up to the network's multiple, then crop
        out = run(np.ascontiguousarray(_pad_to_multiple(image, size_multiple)))
        return out[:, :, : h * scale, : w * scale]
    padded = _pad_to_multiple(image, size_multiple)  # a tile must start on the multiple too
    ph, pw = padded.shape[-2:]
    th, tw = min(tile, ph), min(tile, pw)
    ys, xs = tile_starts(ph, th, overlap), tile_starts(pw, tw, overlap)
    ys = sorted({y // size_multiple * size_multiple for y in ys})
    xs = sorted({x // size_multiple * size_multiple for x in xs})
    acc = np.zeros((b, c, ph * scale, pw * scale), np.float32)
    total = np.zeros((ph * scale, pw * scale), np.float32)
    o = overlap * scale
    for iy, y in enumerate(ys):
        wy = ramp(th * scale, o, iy == 0, iy == len(ys) - 1)
        for ix, x in enumerate(xs):
            wx = ramp(tw * scale, o, ix == 0, ix == len(xs) - 1)
            out = run(np.ascontiguousarray(padded[:, :, y : y + th, x : x + tw]))  # (B, 3, s*th, s*tw)
            weight = wy[:, None] * wx[None, :]
            ys_, xs_ = slice(y * scale, (y + th) * scale), slice(x * scale, (x + tw) * scale)
            acc[:, :, ys_, xs_] += out * weight
            total[ys_, xs_] += weight
    return (acc / total)[:, :, : h * scale, : w * scale]
