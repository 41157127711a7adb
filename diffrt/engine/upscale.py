"""Tiled upscaling with cross-faded overlaps: any image size in bounded memory, without seams."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

# Defaults. A 128-pixel tile keeps one x4 RRDBNet call near 64 MiB per full-resolution feature map (64
# channels at 512x512) and covers an SD 512x512 image in 25 calls of one fixed shape (one TensorRT profile
# point). Zero padding at a tile's edge distorts a conv net's output a few pixels deep; with 16 input pixels
# of overlap the cross-fade sits 4+ pixels away from every tile edge (16+ output pixels at x4), for
# ~(128/112)^2 = 1.3x the calls of tiles butted edge to edge.
TILE, OVERLAP = 128, 16


def tile_starts(size: int, tile: int, overlap: int, multiple: int = 1) -> list[int]:
    """Evenly spread origins of tiles covering [0, size): neighbours share >= overlap, all multiples of `multiple`.

    size and tile must be multiples of `multiple` (the overlap holds when tile - overlap >= multiple). The last
    tile ends at the edge: shifted inward, not padded.
    """
    if size <= tile:
        return [0]
    units, tile_units = size // multiple, tile // multiple
    stride = max((tile - overlap) // multiple, 1)  # largest step (in multiples) that keeps the overlap
    n = -(-(units - tile_units) // stride) + 1
    # Flooring an even spread never makes a step larger than `stride`, so every overlap stays >= `overlap`.
    return [i * (units - tile_units) // (n - 1) * multiple for i in range(n)]


def _rise(n: int, r: int) -> np.ndarray:
    """n weights: 0, then a linear rise over the middle r of them, then 1. _rise(n, r)[::-1] complements it to 1."""
    x = np.arange(n, dtype=np.float32) + 0.5
    return np.clip((x - (n - r) / 2) / r, 0.0, 1.0)


def axis_weights(starts: list[int], tile: int, size: int, scale: int, ramp: int) -> list[np.ndarray]:
    """Per-tile 1-D weights in output pixels (size and tile in input pixels); they sum to 1 at every position.

    Where two tiles share a span, they cross-fade over its middle `ramp` output pixels; each tile's weight is 0
    on the rest of the span nearest its own border, where the zero padding at its edge corrupts its output.
    """
    t, ramp = tile * scale, max(ramp, 1)
    ramps = []
    for i, s in enumerate(starts):
        w = np.ones(t, np.float32)
        if i > 0:  # shared with the previous tile: n output pixels at the start
            n = (starts[i - 1] + tile - s) * scale
            w[:n] = np.minimum(w[:n], _rise(n, min(ramp, n)))
        if i < len(starts) - 1:  # shared with the next tile: n output pixels at the end
            n = (s + tile - starts[i + 1]) * scale
            w[t - n :] = np.minimum(w[t - n :], _rise(n, min(ramp, n))[::-1])
        ramps.append(w)
    # Neighbours' ramps are complementary; only where three tiles meet (a crowded last tile) do they overlap
    # and need normalising. Some tile always has weight 1 at each position, so the total is never 0.
    total = np.zeros(size * scale, np.float32)
    for s, w in zip(starts, ramps):
        total[s * scale : s * scale + t] += w
    return [w / total[s * scale : s * scale + t] for s, w in zip(starts, ramps)]


def upscale_tiled(
    run: Callable[[np.ndarray], np.ndarray],
    image: np.ndarray,
    scale: int,
    tile: int = TILE,
    overlap: int = OVERLAP,
    size_multiple: int = 1,
) -> np.ndarray:
    """(B, 3, H, W) float32 in [0, 1] -> (B, 3, sH, sW), calling `run` on tiles of at most tile x tile pixels."""
    image = np.asarray(image, np.float32)
    b, c, h, w = image.shape
    m = max(size_multiple, 1)
    tile = max(tile // m * m, m)
    overlap = min(overlap, tile // 2)
    # Reflection-pad to the network's multiple (crop afterwards): small images then run whole, and every
    # tile of a large one starts and ends on the multiple.
    ph, pw = -h % m, -w % m
    padded = np.pad(image, ((0, 0), (0, 0), (0, ph), (0, pw)), mode="reflect") if ph or pw else image
    H, W = padded.shape[-2:]
    th, tw = min(tile, H), min(tile, W)  # one tile shape for the whole image
    ys, xs = tile_starts(H, th, overlap, m), tile_starts(W, tw, overlap, m)
    # Cross-fade over half the overlap, centred: smooth enough to hide any seam, and it keeps a quarter of the
    # overlap (the pixels nearest each tile's edge) out of the result.
    ramp = overlap * scale // 2
    wy, wx = axis_weights(ys, th, H, scale, ramp), axis_weights(xs, tw, W, scale, ramp)
    out = np.zeros((b, c, H * scale, W * scale), np.float32)  # (B, 3, sH', sW')
    for y, wgt_y in zip(ys, wy):
        for x, wgt_x in zip(xs, wx):
            up = run(np.ascontiguousarray(padded[:, :, y : y + th, x : x + tw]))  # (B, 3, s*th, s*tw)
            out[:, :, y * scale : (y + th) * scale, x * scale : (x + tw) * scale] += up * np.outer(wgt_y, wgt_x)
    return out[:, :, : h * scale, : w * scale]
