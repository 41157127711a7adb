"""One implementation of one job as a worker process, for interleaved side-by-side timing.

    python benchmarks/peer.py {diffrt|diffusers|optimum} --checkpoint DIR --bundle DIR --steps N --size WxH
                              [--job txt2img|img2img|inpaint] [--strength S] [--src CHECKOUT]

Protocol on stdin/stdout, one JSON object per line: the worker loads, prints {"ready": load_seconds}, then
answers each "run" line with {"total": seconds, "model_calls": seconds} and "quit" with its peak RSS.
optimum runs in its own virtual environment (it pins transformers < 4.58), so each peer is a process.
`--src` imports diffrt from another checkout (e.g. the last release, for before/after numbers); image jobs
start from the same synthetic picture (and a mask over its upper left) in every peer.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

PROMPT, NEGATIVE = "a photograph of an astronaut riding a horse", "blurry"


def job_inputs(args: argparse.Namespace) -> dict:
    """The image job's keyword arguments, the same for every peer: a smooth synthetic picture, a mask."""
    import numpy as np
    from PIL import Image

    if args.job == "txt2img":
        return {}
    w, h = args.size
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    rgb = np.stack([np.sin(6 * xx), np.cos(5 * yy), np.sin(4 * (xx + yy))], -1) * 0.4 + 0.5
    out = {"image": Image.fromarray((rgb * 255).round().astype(np.uint8)), "strength": args.strength}
    if args.job == "inpaint":
        out["mask_image"] = Image.fromarray(((xx < 0.6) & (yy < 0.6)).astype(np.uint8) * 255)
    return out


def timed_sessions(sessions: list) -> list[float]:
    """Wrap ONNX Runtime sessions' run() so the worker can report the time spent inside model calls."""
    spent: list[float] = []
    for sess in sessions:
        run = sess.run

        def wrapped(*a, _run=run, **k):
            t = time.perf_counter()
            try:
                return _run(*a, **k)
            finally:
                spent.append(time.perf_counter() - t)

        sess.run = wrapped
    return spent


def load(kind: str, args: argparse.Namespace):
    """Return a function that runs one generation and returns (total_s, model_calls_s)."""
    w, h = args.size
    extra = job_inputs(args)
    if kind == "diffrt":
        if args.src:
            sys.path.insert(0, str(Path(args.src).resolve()))
        import diffrt
        from diffrt import Pipeline

        print(f"diffrt from {Path(diffrt.__file__).parent}", file=sys.stderr)
        pipe = Pipeline.load(args.bundle, backend="ort-cpu")

        def run(seed: int) -> tuple[float, float]:
            out = pipe(
                PROMPT,
                negative_prompt=NEGATIVE,
                num_inference_steps=args.steps,
                guidance_scale=7.5,
                scheduler="dpmpp_2m",
                height=h,
                width=w,
                seed=seed,
                upscale=False,
                output_type="np",
                **extra,
            )
            t = out.timings
            return t["total"], t["text_encoder"] + t.get("vae_encoder", 0.0) + t["unet"] + t["vae_decoder"]

        return run
    import torch

    if kind == "diffusers":
        from diffusers import (
            AutoPipelineForImage2Image,
            AutoPipelineForInpainting,
            AutoPipelineForText2Image,
            DPMSolverMultistepScheduler,
        )

        # the checkpoint's own pipeline class (SD or SDXL); SDXL takes no safety checker and ignores the argument
        auto = {"txt2img": AutoPipelineForText2Image, "img2img": AutoPipelineForImage2Image}
        pipe = auto.get(args.job, AutoPipelineForInpainting).from_pretrained(args.checkpoint, safety_checker=None)
        spent = None
    else:
        from diffusers import DPMSolverMultistepScheduler
        from optimum.onnxruntime import ORTStableDiffusionPipeline

        if args.job != "txt2img":
            raise SystemExit("the optimum peer runs text to image only")
        exported = Path(args.optimum_dir)
        if not (exported / "model_index.json").exists():
            ORTStableDiffusionPipeline.from_pretrained(args.checkpoint, export=True).save_pretrained(exported)
        pipe = ORTStableDiffusionPipeline.from_pretrained(exported)
        parts = (pipe.text_encoder, pipe.unet, pipe.vae_decoder)
        spent = timed_sessions([p.session for p in parts])
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    def run(seed: int) -> tuple[float, float]:
        if spent is not None:
            spent.clear()
        t = time.perf_counter()
        pipe(
            PROMPT,
            negative_prompt=NEGATIVE,
            num_inference_steps=args.steps,
            guidance_scale=7.5,
            height=h,
            width=w,
            generator=torch.Generator().manual_seed(seed),
            output_type="np",
            **extra,
        )
        total = time.perf_counter() - t
        return total, (sum(spent) if spent is not None else float("nan"))

    return run


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("kind", choices=["diffrt", "diffusers", "optimum"])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--bundle")
    p.add_argument("--optimum-dir")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=lambda s: tuple(int(v) for v in s.split("x")), default=(64, 64))
    p.add_argument("--job", choices=["txt2img", "img2img", "inpaint"], default="txt2img")
    p.add_argument("--strength", type=float, default=0.6)
    p.add_argument("--src", help="diffrt peer: import diffrt from this checkout instead")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t = time.perf_counter()
    run = load(args.kind, args)
    print(json.dumps({"ready": time.perf_counter() - t}), flush=True)
    seed = 0
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        total, calls = run(seed)
        seed += 1
        print(json.dumps({"total": total, "model_calls": calls}), flush=True)
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)


if __name__ == "__main__":
    main()
