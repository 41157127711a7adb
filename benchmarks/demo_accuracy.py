"""Prompt accuracy of the demo model through diffrt and through diffusers, on the same checkpoint and latents.

    python benchmarks/demo_accuracy.py                     # the built-in demo (bundle built on first use)
    python benchmarks/demo_accuracy.py --steps 30 --scheduler euler --guidance 7.5 --per-prompt

Prints, per implementation, the share of pictures with the right background colour, object colour, side (when
the prompt names one) and shape, and how often the two implementations read the same.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from diffrt.demo import CHECKPOINT, DEMO_DEFAULTS, demo_bundle
from diffrt.demo.accuracy import format_summary, run_suite, summary
from diffrt.demo.reference import DIFFUSERS_SCHEDULERS, diffrt_generator, diffusers_generator


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, help="bundle of the checkpoint (default: the demo bundle)")
    p.add_argument("--checkpoint", type=Path, default=CHECKPOINT, help="diffusers folder for the reference")
    p.add_argument("--scheduler", default=DEMO_DEFAULTS["scheduler"], choices=sorted(DIFFUSERS_SCHEDULERS))
    p.add_argument("--steps", type=int, default=DEMO_DEFAULTS["num_inference_steps"])
    p.add_argument("--guidance", type=float, default=DEMO_DEFAULTS["guidance_scale"])
    p.add_argument("--no-diffusers", action="store_true", help="diffrt only")
    p.add_argument("--per-prompt", action="store_true", help="print every prompt's reading")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    bundle = args.bundle or demo_bundle()
    runs = {"diffrt": diffrt_generator(bundle, args.scheduler, args.steps, args.guidance)}
    if not args.no_diffusers:
        runs["diffusers"] = diffusers_generator(args.checkpoint, args.scheduler, args.steps, args.guidance)
    results = {}
    for name, generate in runs.items():
        t0 = time.perf_counter()
        results[name] = run_suite(generate)
        print(format_summary(name, summary(results[name])), f" ({time.perf_counter() - t0:.1f} s)")
    if args.per_prompt:
        for r in results["diffrt"]:
            x = f"({r.reading.centre[0]:4.1f}, {r.reading.centre[1]:4.1f})" if r.reading.centre else "-"
            print(
                f"{r.prompt:60s} seed {r.seed}: bg {r.reading.background:6s} obj {r.reading.colour or '-':6s} "
                f"at {x} {r.reading.shape or '-'}  side ok: {r.position_ok}"
            )
    if len(results) == 2:
        pairs = zip(results["diffrt"], results["diffusers"])
        same = sum(
            (a.reading.background, a.reading.colour) == (b.reading.background, b.reading.colour) for a, b in pairs
        )
        print(f"same colours read from diffrt and diffusers: {same}/{len(results['diffrt'])}")


if __name__ == "__main__":
    main()
