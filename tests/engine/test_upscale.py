"""Tiled upscaling against a whole-image run of a real (tiny) ESRGAN, and the pipeline's upscale stage."""

import numpy as np
import pytest
import torch

from diffrt import Pipeline
from diffrt.engine.upscale import tile_starts, upscale_tiled
from diffrt.export.upscaler import load_upscaler
from tests.builders.upscaler import build_compact, build_esrgan_old


@pytest.fixture(scope="module")
def esrgan(tmp_path_factory):
    return load_upscaler(build_esrgan_old(tmp_path_factory.mktemp("up") / "e.pth", seed=2))


def torch_run(module, seen):
    def run(x: np.ndarray) -> np.ndarray:
        seen.append(x.shape)
        with torch.no_grad():
            return module(torch.from_numpy(x)).numpy()

    return run


@pytest.mark.parametrize(("h", "w"), [(70, 150), (64, 64), (23, 41), (130, 47)])
def test_tiles_match_the_whole_image_without_seams(esrgan, h, w):
    image = np.random.default_rng(h * w).random((1, 3, h, w), dtype=np.float32)
    # Smooth content, so a seam would stand out against small differences elsewhere.
    image = (image + np.roll(image, 1, 2) + np.roll(image, 1, 3)) / 3
    seen: list = []
    tiled = upscale_tiled(torch_run(esrgan.module, seen), image, 4, tile=32, overlap=8)
    whole = torch_run(esrgan.module, [])(image)
    assert tiled.shape == whole.shape == (1, 3, 4 * h, 4 * w)
    assert all(s[2] <= 32 and s[3] <= 32 for s in seen), seen  # bounded memory: no tile over 32x32
    err = np.abs(tiled - whole)
    assert err.max() < 0.05 and err.mean() < 2e-3
    # Along tile borders the error is no worse than in the rest of the image.
    borders = [4 * y for y in tile_starts(h, 32, 8)[1:]] + [4 * (y + 32) for y in tile_starts(h, 32, 8)[:-1]]
    if borders:
        rows = np.clip(np.array(borders), 0, 4 * h - 1)
        assert err[:, :, rows, :].mean() < 3 * err.mean() + 1e-4


def test_small_images_run_whole_and_multiples_are_respected(tmp_path):
    up = load_upscaler(build_compact(tmp_path / "c.safetensors", scale=2))
    seen: list = []
    image = np.random.default_rng(0).random((2, 3, 13, 9), dtype=np.float32)
    out = upscale_tiled(torch_run(up.module, seen), image, 2, tile=32, overlap=8, size_multiple=4)
    assert out.shape == (2, 3, 26, 18)
    assert seen == [(2, 3, 16, 12)]  # padded up to the multiple, one call


def test_tile_starts_cover_the_axis():
    for size in (1, 31, 32, 33, 100, 257):
        starts = tile_starts(size, 32, 8)
        covered = np.zeros(size, bool)
        for s in starts:
            covered[s : s + 32] = True
        assert covered.all() and starts[-1] + min(32, size) == size


def test_pipeline_upscales_through_the_bundle(sd1_upscaled_bundle):
    pipe = Pipeline.load(sd1_upscaled_bundle, backend="ort-cpu")
    out = pipe("a red circle", num_inference_steps=2, seed=3, output_type="np")
    plain = pipe("a red circle", num_inference_steps=2, seed=3, output_type="np", upscale=False)
    assert out.images[0].shape == (256, 256, 3) and plain.images[0].shape == (64, 64, 3)
    assert out.timings["upscaler"] > 0 and 0 <= out.images[0].min() and out.images[0].max() <= 1
    assert "ESRGAN x4" in out.parameters["upscaled"]
