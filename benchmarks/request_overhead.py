"""Host cost of building and resolving a Request: what every entry point pays before any model runs.

    python benchmarks/request_overhead.py BUNDLE [--runs 2000]

Timed: `Request(...)` plus `resolve(manifest)` (defaults from the bundle, every field checked) for text to
image, and for image to image with a PNG of the bundle's native size (decode, resize, strength checks), which
is dominated by the PNG decode, reported beside PIL's decode alone. Medians; target < 0.1 ms for text to image.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import numpy as np
from PIL import Image

from diffrt.bundle import load_manifest
from diffrt.engine.request import Request

TARGET_MS = 0.1


def median_ms(fn, runs: int) -> float:
    samples = []
    for _ in range(runs + 20):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1000)
    return statistics.median(samples[20:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle")
    p.add_argument("--runs", type=int, default=2000)
    args = p.parse_args()
    manifest = load_manifest(args.bundle)
    side = manifest.model.default_size
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, format="PNG")
    png = buf.getvalue()

    def txt2img():
        Request("a cat", negative_prompt="blurry", seed=3, num_images=2).resolve(manifest)

    def img2img():
        Request("a cat", image=png, strength=0.6).resolve(manifest)

    def decode():
        Image.open(io.BytesIO(png)).load()

    few = max(args.runs // 20, 20)
    t2i, i2i, dec = median_ms(txt2img, args.runs), median_ms(img2img, few), median_ms(decode, few)
    print(f"Request + resolve, median ms (bundle native size {side}x{side}):")
    print(f"  text to image   {t2i:8.4f}   ({'within' if t2i < TARGET_MS else 'over'} the {TARGET_MS} ms target)")
    print(f"  image to image  {i2i:8.4f}   (of which PIL's decode of the PNG alone: {dec:.4f})")


if __name__ == "__main__":
    main()
