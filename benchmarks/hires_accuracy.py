"""Does the hires fix keep the demo model's prompt accuracy? The 35-prompt suite x 2 seeds, read the same way
(averaged down to 64x64), for one pass at the native 64x64, one pass straight at 128x128, and 64 -> 128 with the
hires fix (latent and ESRGAN upscalers, the default strength 0.7).

    python benchmarks/hires_accuracy.py [--strength 0.7]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from diffrt import Pipeline
from diffrt.demo import demo_bundle
from diffrt.demo.accuracy import SEEDS, Result, format_summary, summary
from diffrt.demo.scenes import analyse, prompt_suite
from diffrt.engine.hires import HiresOptions


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--strength", type=float, default=HiresOptions.strength)
    args = p.parse_args()
    pipe = Pipeline.load(demo_bundle(), backend="ort-cpu")
    big = dict(height=128, width=128)
    variants = {
        "64": {},
        "128": big,
        "hires-lat": {"hires": HiresOptions(upscaler="latent", strength=args.strength)},
        "hires-esr": {"hires": HiresOptions(upscaler="esrgan", strength=args.strength)},
    }
    for name, kw in variants.items():
        t0 = time.perf_counter()
        results, sizes = [], set()
        for scene in prompt_suite():
            prompt = scene.caption()
            for seed in SEEDS:
                image = pipe(prompt, seed=seed, upscale=False, output_type="np", **kw).images[0]
                sizes.add(image.shape[:2])
                u8 = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
                results.append(Result(scene, prompt, seed, analyse(u8)))
        took = time.perf_counter() - t0
        print(format_summary(name, summary(results)), f" size {sorted(sizes)}  {took:.0f} s")


if __name__ == "__main__":
    main()
