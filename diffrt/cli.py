"""The `diffrt` command line. Handlers import their half lazily, so `generate` never loads torch."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from diffrt.errors import BadInput, DiffrtError

log = logging.getLogger("diffrt")


def _image_range(text: str) -> tuple[int, int, int]:
    try:
        lo, opt, hi = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("expected MIN,OPT,MAX image sides in pixels, e.g. 256,512,1024") from None
    return lo, opt, hi


def _quiet_export_libraries() -> None:
    """Our own stage lines report export progress; the libraries' per-file bars would interleave with them."""
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def cmd_export(args: argparse.Namespace) -> int:
    from diffrt.export.bundle_writer import ExportOptions, export_bundle

    _quiet_export_libraries()

    opts = ExportOptions(
        opset=args.opset,
        validate=not args.no_validate,
        force=args.force,
        prediction_type=args.prediction_type,
        tokenizer=args.tokenizer,
        image_range=args.image_range,
    )
    export_bundle(args.source, args.output, upscaler=args.upscaler, opts=opts)
    return 0


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError("expected WIDTHxHEIGHT, e.g. 512x512") from None
    return w, h


# scheduler None: the bundle's own default (LCM's and Turbo's samplers, else DPM++ 2M Karras).
GENERATE_DEFAULTS = {"steps": 30, "guidance": 7.5, "scheduler": None}


def _pair(text: str) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("expected two integers separated by a comma, e.g. 1024,1024") from None
    return a, b


def cmd_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from diffrt.engine.images import parameters_text, save_png
    from diffrt.engine.pipeline import Pipeline

    width, height = args.size if args.size else (None, None)
    out = Path(args.output)
    if not out.parent.is_dir():
        raise BadInput(f"output folder {out.parent} does not exist; create it or choose another -o")
    bundle = args.bundle
    defaults = GENERATE_DEFAULTS
    if bundle == "demo":  # the built-in bundle (a folder named demo is ./demo)
        from diffrt.demo import DEMO_DEFAULTS, demo_bundle, demo_is_built

        defaults = DEMO_DEFAULTS

        if not demo_is_built():
            try:
                _quiet_export_libraries()
            except ImportError:
                pass  # demo_bundle names the missing extra
        bundle = demo_bundle()
    pipe = Pipeline.load(bundle, backend=args.backend, threads=args.threads)
    sdxl_args = (
        args.prompt_2,
        args.negative_prompt_2,
        args.original_size,
        args.target_size,
        args.crops_coords_top_left,
    )
    if pipe.manifest.model.family != "sdxl" and any(v is not None for v in sdxl_args):
        raise BadInput(
            f"--prompt-2, --negative-prompt-2 and the size/crop options apply to SDXL bundles; {args.bundle} is "
            f"{pipe.manifest.model.family}: leave them out"
        )
    bars: list[tqdm] = []  # made on the first step, so that a request refused up front prints only its error

    def progress(step: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, desc="denoise", unit="call", disable=args.quiet, leave=False))
        bars[0].update(1)

    try:
        result = pipe(
            args.prompt,
            negative_prompt=args.negative,
            num_inference_steps=defaults["steps"] if args.steps is None else args.steps,
            guidance_scale=defaults["guidance"] if args.guidance is None else args.guidance,
            scheduler=args.scheduler or defaults["scheduler"],
            height=height,
            width=width,
            num_images=args.num_images,
            seed=args.seed,
            upscale=not args.no_upscale,
            callback=progress,
            prompt_2=args.prompt_2,
            negative_prompt_2=args.negative_prompt_2,
            original_size=args.original_size,
            target_size=args.target_size,
            crops_coords_top_left=args.crops_coords_top_left or (0, 0),
        )
    finally:
        for bar in bars:
            bar.close()
    t = result.timings
    log.info("timings: " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in t.items()))
    text = parameters_text(args.prompt, args.negative, result.parameters)
    paths = (
        [out]
        if len(result.images) == 1
        else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(len(result.images))]
    )
    for image, path in zip(result.images, paths):
        save_png(image, path, text)
        log.info("wrote %s (%dx%d)", path, image.width, image.height)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from diffrt.engine.bench import BenchSettings, format_table, run_bench, write_json

    if args.warmup < 0 or args.runs < 1:
        raise BadInput("--runs must be >= 1 and --warmup >= 0")
    width, height = args.size if args.size else (None, None)
    settings = BenchSettings(
        backend=args.backend,
        steps=args.steps,
        width=width,
        height=height,
        batch=args.batch,
        scheduler=args.scheduler,
        guidance_scale=args.guidance,
        warmup=args.warmup,
        runs=args.runs,
        upscale=not args.no_upscale,
        threads=args.threads,
    )
    bar = tqdm(total=args.warmup + args.runs, desc="bench", unit="run", disable=args.quiet, leave=False)
    report = run_bench(args.bundle, settings, progress=lambda: bar.update(1))
    bar.close()
    print(format_table(report))
    if args.json:
        write_json(report, args.json)
        log.info("wrote %s", args.json)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from diffrt import __version__

    parser = argparse.ArgumentParser(prog="diffrt", description="Stable Diffusion checkpoints to fast engines.")
    parser.add_argument("--version", action="version", version=f"diffrt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "export",
        help="checkpoint (+ upscaler) -> validated FP32/FP16 ONNX bundle",
        description="Export a Stable Diffusion 1.x/2.x checkpoint (diffusers folder, hub id or "
        "single-file .safetensors) and optionally an ESRGAN-family upscaler to an ONNX bundle.",
    )
    p.add_argument("source", help="diffusers folder, hub id (online only) or single-file .safetensors")
    p.add_argument("-o", "--output", type=Path, required=True, help="bundle directory to create")
    p.add_argument("--upscaler", type=Path, help="ESRGAN / Real-ESRGAN(-Compact) weights: .pth or .safetensors")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument("--no-validate", action="store_true", help="skip the ONNX Runtime vs torch comparison")
    p.add_argument(
        "--prediction-type",
        choices=["epsilon", "v_prediction"],
        help="override the scheduler's prediction type (single files: sd1 epsilon, sd2 v_prediction)",
    )
    p.add_argument("--tokenizer", type=Path, help="tokenizer folder (vocab.json, merges.txt) for single files")
    p.add_argument(
        "--image-range",
        type=_image_range,
        metavar="MIN,OPT,MAX",
        help="image sides the bundle accepts (default: half to twice the native size)",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "generate",
        help="prompt -> PNG from a bundle",
        description="Generate images from a bundle; PNGs carry the settings in a 'parameters' "
        "text chunk (A1111's format).",
    )
    p.add_argument("bundle", help="bundle directory, or `demo` for the built-in scene model (built on first use)")
    p.add_argument("prompt")
    p.add_argument("-o", "--output", default="out.png", help="PNG path; with several images -0, -1, ... are added")
    p.add_argument("--negative", help="negative prompt")
    p.add_argument("--steps", type=int, help="sampling steps (default 30; demo: 20)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale, <= 1: off (default 7.5; demo: 2)")
    p.add_argument(
        "--scheduler",
        help="sampler (default: the bundle's, i.e. lcm for LCM, the checkpoint's for Turbo, else dpmpp_2m_karras; "
        "demo: dpmpp_2m): ddim, pndm, euler, euler_a, heun, lms, "
        "dpmpp_2m, dpmpp_2m_karras, dpmpp_2m_sde_karras, unipc, lcm (or their diffusers/A1111 names)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=_size, metavar="WxH", help="image size (default: the checkpoint's native size)")
    p.add_argument("--num-images", type=int, default=1)
    sdxl = p.add_argument_group("SDXL conditioning (diffusers' names and defaults)")
    sdxl.add_argument("--prompt-2", help="prompt for the second text encoder (default: the prompt)")
    sdxl.add_argument("--negative-prompt-2", help="negative prompt for the second text encoder (default: --negative)")
    sdxl.add_argument("--original-size", type=_pair, metavar="H,W", help="default: the image size")
    sdxl.add_argument("--target-size", type=_pair, metavar="H,W", help="default: the image size")
    sdxl.add_argument("--crops-coords-top-left", type=_pair, metavar="TOP,LEFT", help="default: 0,0")
    p.add_argument("--no-upscale", action="store_true", help="skip the bundle's upscaler")
    p.add_argument("--backend", default="auto", help="auto, tensorrt, ort-cuda or ort-cpu")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for ort-cpu (default: all cores)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "bench",
        help="per-stage latency, memory and host overhead of a bundle",
        description="Warm-up runs, then timed runs; medians and p90 per stage.",
    )
    p.add_argument("bundle")
    p.add_argument("--backend", default="auto", help="auto, tensorrt, ort-cuda or ort-cpu")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=_size, metavar="WxH", help="image size (default: native)")
    p.add_argument("--batch", type=int, default=1, help="images per call")
    p.add_argument("--scheduler", help="sampler (default: the bundle's)")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--no-upscale", action="store_true")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the report with the environment as JSON")
    p.set_defaults(func=cmd_bench)

    from diffrt.engine.trt_cli import add_build_parser

    add_build_parser(sub)

    from diffrt.serve.cli import add_serve_parser

    add_serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    # diffrt's own lines go to stderr as plain messages; a fresh handler per call follows sys.stderr.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    for noisy in ("torch", "onnxscript", "onnx_ir", "diffusers", "transformers", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    try:
        return args.func(args)
    except DiffrtError as e:
        print(f"diffrt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffrt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
