"""Tiled upscaling against a whole-image run of a real (tiny) ESRGAN, and the pipeline's upscale stage."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from diffrt import Pipeline  # noqa: E402
from diffrt.engine.upscale import axis_weights, tile_starts, upscale_tiled  # noqa: E402
from diffrt.export.upscaler import load_upscaler  # noqa: E402
from tests.builders.upscaler import build_compact, build_esrgan_new, build_esrgan_old, onnx_session  # noqa: E402

# Tiled vs whole-image, max |difference| on a [0, 1] image: 2e-3, half an 8-bit level. (Measured on the tiny
# ESRGAN: ~1e-3 at overlap 8 and ~2e-5 at 16; tiles butted edge to edge are off by ~0.14.)
TOLERANCE = 2e-3


@pytest.fixture(scope="module")
def esrgan(tmp_path_factory):
    return load_upscaler(build_esrgan_old(tmp_path_factory.mktemp("up") / "e.pth", seed=2))


def torch_run(module, seen=None):
    def run(x: np.ndarray) -> np.ndarray:
        if seen is not None:
            seen.append(x.shape)
        with torch.no_grad():
            return module(torch.from_numpy(x)).numpy()

    return run


def smooth_image(b, h, w, seed=0):
    image = np.random.default_rng(seed).random((b, 3, h, w), dtype=np.float32)
    return (image + np.roll(image, 1, 2) + np.roll(image, 1, 3)) / 3  # a seam would stand out against this


def edge_band(starts, tile, size, scale):
    """Output indices within one input pixel of a tile edge that lies inside the image."""
    edges = [s for s in starts[1:]] + [s + tile for s in starts[:-1]]
    idx = {scale * e + d for e in edges for d in range(-scale, scale)}
    return np.array(sorted(i for i in idx if 0 <= i < size * scale), dtype=int)


def seam_ratios(tiled, whole, starts, tile, size, scale, axis) -> tuple[float, float]:
    """Along `axis`: the largest error, and the largest step in the error between neighbouring pixels, at
    tile edges over the same away from them (1e-5 absorbs float noise). A seam shows as a ratio well above 1."""
    other = tuple(a for a in range(4) if a != axis)
    err = np.abs(tiled - whole).max(axis=other)
    step = np.abs(np.diff(tiled - whole, axis=axis)).max(axis=other)  # step[i]: between pixels i and i + 1
    band = edge_band(starts, tile, size, scale)
    if band.size == 0:  # a single tile along this axis
        return 0.0, 0.0
    rest = np.setdiff1d(np.arange(err.size), band)
    band_s, rest_s = band[band < step.size], rest[rest < step.size]
    return (float(err[band].max() / (err[rest].max() + 1e-5)), float(step[band_s].max() / (step[rest_s].max() + 1e-5)))


@pytest.mark.parametrize(
    ("h", "w", "overlap"), [(70, 150, 8), (70, 150, 16), (64, 64, 8), (23, 41, 8), (130, 47, 12), (20, 28, 8)]
)
def test_tiles_match_the_whole_image_without_seams(esrgan, h, w, overlap):
    image = smooth_image(2, h, w, seed=h * w)
    seen: list = []
    tiled = upscale_tiled(torch_run(esrgan.module, seen), image, 4, tile=32, overlap=overlap)
    whole = torch_run(esrgan.module)(image)
    assert tiled.shape == whole.shape == (2, 3, 4 * h, 4 * w) and tiled.dtype == np.float32
    # Bounded memory: every call gets the same tile shape, at most 32x32; images under a tile run whole.
    th, tw = min(32, h), min(32, w)
    ys, xs = tile_starts(h, th, overlap), tile_starts(w, tw, overlap)
    assert seen == [(2, 3, th, tw)] * (len(ys) * len(xs))
    assert np.abs(tiled - whole).max() <= TOLERANCE
    # No seams: the error at tile edges is no larger than elsewhere (25% margin), nor is its step.
    for starts, tile, size, axis in ((ys, th, h, 2), (xs, tw, w, 3)):
        assert max(seam_ratios(tiled, whole, starts, tile, size, 4, axis)) <= 1.25


def test_the_seam_check_catches_butted_tiles(esrgan):
    """The negative control: tiles butted edge to edge, with no overlap, fail the checks above."""
    image, run = smooth_image(1, 64, 64), torch_run(esrgan.module)
    butted = np.concatenate(
        [np.concatenate([run(image[:, :, y : y + 32, x : x + 32]) for x in (0, 32)], 3) for y in (0, 32)], 2
    )
    whole = run(image)
    assert np.abs(butted - whole).max() > 20 * TOLERANCE
    assert seam_ratios(butted, whole, [0, 32], 32, 64, 4, axis=2)[1] > 1.5


def onnx_runner(module, seen):
    """The module exported with dynamic height/width and run in onnxruntime, as the runtime does."""
    session = onnx_session(module, (32, 32))

    def run(x: np.ndarray) -> np.ndarray:
        seen.append(x.shape)
        return session.run(None, {"image": x})[0]

    return run


def test_unshuffled_esrgan_through_onnxruntime_keeps_the_multiple(tmp_path):
    """Real-ESRGAN x2 (pixel-unshuffle) needs sides that are multiples of 4: edge tiles still start on one."""
    up = load_upscaler(build_esrgan_new(tmp_path / "x2.safetensors", scale=2, seed=4))
    assert up.size_multiple == 4
    image, seen = smooth_image(1, 45, 70), []
    # Unshuffled, the network works at half resolution, so its reach in input pixels doubles: overlap 16.
    tiled = upscale_tiled(onnx_runner(up.module, seen), image, 2, tile=42, overlap=16, size_multiple=4)
    assert tiled.shape == (1, 3, 90, 140)
    assert seen == [(1, 3, 40, 40)] * 6  # tile rounded down to the multiple; 48 x 72 padded -> 2 x 3 tiles
    # The reference pads the same way (reflection) for the whole image; only tiling differs.
    padded = np.pad(image, ((0, 0), (0, 0), (0, 3), (0, 2)), mode="reflect")
    whole = torch_run(up.module)(padded)[:, :, :90, :140]
    assert np.abs(tiled - whole).max() <= TOLERANCE


@pytest.mark.parametrize(("h", "w"), [(13, 9), (1, 6)])
def test_small_images_run_whole_padded_to_the_multiple(tmp_path, h, w):
    up = load_upscaler(build_compact(tmp_path / "c.safetensors", scale=2))
    seen: list = []
    image = smooth_image(2, h, w)
    out = upscale_tiled(torch_run(up.module, seen), image, 2, tile=32, overlap=8, size_multiple=4)
    assert out.shape == (2, 3, 2 * h, 2 * w)
    assert seen == [(2, 3, h + (-h % 4), w + (-w % 4))]  # one call, padded up to the multiple
    padded = np.pad(image, ((0, 0), (0, 0), (0, -h % 4), (0, -w % 4)), mode="reflect")
    assert np.array_equal(out, torch_run(up.module)(padded)[:, :, : 2 * h, : 2 * w])


def test_tile_starts_cover_the_axis_with_the_overlap():
    for size in (1, 31, 32, 33, 100, 257):
        for multiple in (1, 4):
            size_m = size + (-size % multiple)
            tile = min(32, size_m)
            starts = tile_starts(size_m, tile, 8, multiple)
            assert starts[0] == 0 and starts[-1] + tile == size_m  # the last tile is shifted inward
            assert all(s % multiple == 0 for s in starts)
            assert all(0 < b - a <= tile - 8 for a, b in zip(starts, starts[1:]))  # neighbours share >= 8


@pytest.mark.parametrize(("size", "tile", "overlap", "scale"), [(100, 32, 8, 4), (33, 32, 8, 2), (257, 48, 16, 1)])
def test_weights_are_a_partition_of_unity(size, tile, overlap, scale):
    starts = tile_starts(size, tile, overlap)
    total = np.zeros(size * scale)
    for s, w in zip(starts, axis_weights(starts, tile, size, scale, overlap * scale // 2)):
        assert w.min() >= 0 and w[: scale * overlap // 4].max() <= (0 if s > 0 else 1)  # edge pixels left out
        total[s * scale : (s + tile) * scale] += w
    np.testing.assert_allclose(total, 1.0, atol=1e-6)


def test_pipeline_upscales_through_the_bundle(sd1_upscaled_bundle):
    pipe = Pipeline.load(sd1_upscaled_bundle, backend="ort-cpu")
    out = pipe("a red circle", num_inference_steps=2, seed=3, output_type="np")
    plain = pipe("a red circle", num_inference_steps=2, seed=3, output_type="np", upscale=False)
    assert out.images[0].shape == (256, 256, 3) and plain.images[0].shape == (64, 64, 3)
    assert out.timings["upscaler"] > 0 and 0 <= out.images[0].min() and out.images[0].max() <= 1
    assert "ESRGAN x4" in out.parameters["upscaled"]
