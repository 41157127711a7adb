"""The `diffrt` command line. Handlers import their half lazily, so `generate` never loads torch."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from diffrt.errors import BadInput, DiffrtError
from diffrt.specs import SDShapes

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
        prompt_chunks=args.prompt_chunks,
        loras=tuple((Path(f), scale) for f, scale in args.lora),
        **({"graph_cache": args.graph_cache} if args.graph_cache else {}),
    )
    export_bundle(args.source, args.output, upscaler=args.upscaler, opts=opts)
    return 0


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError("expected WIDTHxHEIGHT, e.g. 512x512") from None
    return w, h


def _pair(text: str) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("expected two integers separated by a comma, e.g. 1024,1024") from None
    return a, b


SDXL_FLAGS = {  # Request field -> flag: SDXL conditioning, refused on other bundles
    "prompt_2": "--prompt-2",
    "negative_prompt_2": "--negative-prompt-2",
    "original_size": "--original-size",
    "target_size": "--target-size",
    "crops_coords_top_left": "--crops-coords-top-left",
}


def add_hires_flags(p: argparse.ArgumentParser) -> None:
    from diffrt.engine.hires import UPSCALERS, HiresOptions

    hires = p.add_argument_group("hires fix: a second pass at a larger size (A1111's names and defaults)")
    hires.add_argument("--hires", type=float, metavar="SCALE", help="upscale by SCALE in [1, 4] and refine, e.g. 2")
    hires.add_argument(
        "--hires-upscaler",
        help=f"{', '.join(UPSCALERS)} (default {HiresOptions.upscaler}; esrgan: the bundle's upscaler)",
    )
    hires.add_argument(
        "--hires-strength", type=float, help=f"denoising strength of the second pass (default {HiresOptions.strength})"
    )
    hires.add_argument("--hires-steps", type=int, help="steps of the second pass (default: --steps)")


def hires_from_args(args: argparse.Namespace):
    """HiresOptions from the --hires flags (None without --hires); options left out keep HiresOptions' defaults."""
    from diffrt.engine.hires import HiresOptions

    given = {k: getattr(args, f"hires_{k}") for k in ("upscaler", "strength", "steps")}
    given = {k: v for k, v in given.items() if v is not None}
    if args.hires is None:
        if given:
            raise BadInput(f"--hires-{next(iter(given))} needs --hires SCALE (the second pass's upscale, e.g. 2)")
        return None
    return HiresOptions(scale=args.hires, **given)


def add_embedding_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--embeddings",
        type=Path,
        metavar="DIR",
        help="textual inversion embeddings (.safetensors) that prompts call by file name, as A1111's",
    )
    p.add_argument(
        "--allow-pickle", action="store_true", help="also read .pt/.bin embeddings (pickles run code; needs torch)"
    )


def lora_arg(text: str) -> tuple[str, float]:
    """`FILE[:SCALE]` -> (FILE, SCALE); the scale is 1 when left out."""
    name, sep, tail = text.rpartition(":")
    if sep:
        try:
            return name, float(tail)
        except ValueError:
            pass
    if not text:
        raise argparse.ArgumentTypeError("expected FILE[:SCALE], e.g. style.safetensors:0.8")
    return text, 1.0


def add_lora_flag(p: argparse.ArgumentParser, meaning: str) -> None:
    p.add_argument("--lora", type=lora_arg, action="append", default=[], metavar="FILE[:SCALE]", help=meaning)


def add_lora_flags(p: argparse.ArgumentParser, files: bool = True) -> None:
    if files:
        add_lora_flag(p, "merge a LoRA at SCALE (default 1); repeat for several; a name is looked up in --lora-dir")
    p.add_argument(
        "--lora-dir",
        type=Path,
        metavar="DIR",
        help="LoRAs that requests and <lora:NAME:SCALE> prompt tags call by file name, as A1111's",
    )


def request_from_args(args: argparse.Namespace):
    """The generate flags as one Request; flags left out stay None, so the Request's defaults apply."""
    from diffrt.engine.request import Request

    width, height = args.size if args.size else (None, None)
    fields = {
        "negative_prompt": args.negative,
        "prompt_syntax": args.prompt_syntax,
        "clip_skip": args.clip_skip,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance,
        "scheduler": args.scheduler,
        "height": height,
        "width": width,
        "num_images": args.num_images,
        "seed": args.seed,
        "upscale": not args.no_upscale,
        "image": args.image,
        "mask_image": args.mask,
        "strength": args.strength,
        "paste_back": args.paste_back or None,
        "mask_blur": args.mask_blur,
        "hires": hires_from_args(args),
        "refiner_at": args.refiner_at,
        "loras": tuple(args.lora) or None,
        **{name: getattr(args, name) for name in SDXL_FLAGS},
    }
    return Request(args.prompt, **{k: v for k, v in fields.items() if v is not None})


def cmd_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from diffrt.engine.images import parameters_text, save_png
    from diffrt.engine.pipeline import Pipeline

    out = Path(args.output)
    if not out.parent.is_dir():
        raise BadInput(f"output folder {out.parent} does not exist; create it or choose another -o")
    request = request_from_args(args)
    bundle = args.bundle
    if bundle == "demo":  # the built-in bundle (a folder named demo is ./demo)
        from diffrt.demo import demo_bundle, demo_is_built

        if not demo_is_built():
            try:
                _quiet_export_libraries()
            except ImportError:
                pass  # demo_bundle names the missing extra
        bundle = demo_bundle()
    pipe = Pipeline.load(
        bundle,
        backend=args.backend,
        threads=args.threads,
        refiner=args.refiner,
        embeddings=args.embeddings,
        allow_pickle=args.allow_pickle,
        lora_dir=args.lora_dir,
    )
    given = [flag for name, flag in SDXL_FLAGS.items() if getattr(args, name) is not None]
    if pipe.manifest.model.family != "sdxl" and given:
        raise BadInput(
            f"{', '.join(given)} apply to SDXL bundles; {args.bundle} is {pipe.manifest.model.family}: leave them out"
        )
    request = pipe.check_request(request)  # every mistake is reported before the progress bar starts
    bars: list[tqdm] = []

    def progress(step: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, desc="denoise", unit="call", disable=args.quiet, leave=False))
        bars[0].update(1)

    try:
        result = pipe.generate(request, callback=progress)
    finally:
        for bar in bars:
            bar.close()
    t = result.timings
    log.info("timings: " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in t.items()))
    paths = (
        [out]
        if len(result.images) == 1
        else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(len(result.images))]
    )
    for i, (image, path) in enumerate(zip(result.images, paths)):
        save_png(image, path, parameters_text(args.prompt, args.negative, result.parameters, index=i))
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
        hires=hires_from_args(args),
        prompt=args.prompt or BenchSettings.prompt,
        prompt_syntax=args.prompt_syntax or BenchSettings.prompt_syntax,
        clip_skip=args.clip_skip,
        embeddings=args.embeddings,
        loras=tuple(args.lora),
        lora_dir=args.lora_dir,
    )
    bar = tqdm(total=args.warmup + args.runs, desc="bench", unit="run", disable=args.quiet, leave=False)
    report = run_bench(args.bundle, settings, progress=lambda: bar.update(1))
    bar.close()
    print(format_table(report))
    if args.json:
        write_json(report, args.json)
        log.info("wrote %s", args.json)
    return 0


def span(text: str) -> tuple[int, int]:
    """`N` or `MIN-MAX` -> (min, max)."""
    try:
        lo, _, hi = text.partition("-")
        return int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or MIN-MAX, e.g. 512 or 256-768, got {text!r}") from None


def add_build_parser(subparsers) -> argparse.ArgumentParser:
    """`diffrt build`: the flags map onto trt_build.BuildOptions, and build_command writes them back."""
    p = subparsers.add_parser(
        "build",
        help="TensorRT plans for a bundle (needs TensorRT and an NVIDIA GPU)",
        description="Build strongly typed FP16 TensorRT plans from a bundle's FP16 ONNX graphs into "
        "BUNDLE/trt/<key>/. The key covers the ONNX graphs, TensorRT version, GPU and these options, so "
        "matching plans are reused and stale ones are never loaded.",
    )
    p.add_argument("bundle", type=Path, help="bundle directory made by `diffrt export`")
    p.add_argument(
        "--profile",
        choices=["static", "dynamic"],
        default="static",
        help="static: one shape (fastest, least memory); dynamic: a range of sizes and batches (default static)",
    )
    p.add_argument("--height", type=span, metavar="PX|MIN-MAX", help="image height (default: native size)")
    p.add_argument("--width", type=span, metavar="PX|MIN-MAX", help="image width (default: native size)")
    p.add_argument("--batch", type=span, metavar="N|MIN-MAX", help="images per call (default 1)")
    p.add_argument(
        "--opt-level", type=int, default=3, metavar="0-5", help="TensorRT builder optimization level 0-5 (default 3)"
    )
    p.add_argument("--timing-cache", type=Path, metavar="FILE", help="persistent tactic timing cache to read/update")
    p.add_argument("--workspace", type=float, metavar="GB", help="tactic scratch memory limit (default: TensorRT's)")
    p.add_argument("--no-guidance", action="store_true", help="plans for guidance_scale <= 1 (UNet batch = images)")
    p.set_defaults(func=cmd_build)
    return p


def options_from_args(args: argparse.Namespace):
    from diffrt.engine.trt_build import BuildOptions

    return BuildOptions(
        profile=args.profile,
        height=args.height,
        width=args.width,
        batch=args.batch,
        guidance=not args.no_guidance,
        opt_level=args.opt_level,
        workspace_gb=args.workspace,
    )


def cmd_build(args: argparse.Namespace) -> int:
    from diffrt.engine.trt_build import build_bundle, check_build
    from diffrt.engine.trt_env import available_reason

    options = options_from_args(args)  # option and size mistakes first: they need no GPU to report
    check_build(args.bundle, options)
    reason = available_reason()
    if reason:
        raise BadInput(f"diffrt build needs TensorRT and an NVIDIA GPU: {reason}")
    build_bundle(args.bundle, options, args.timing_cache)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from diffrt import __version__
    from diffrt.demo import DEMO_DEFAULTS
    from diffrt.engine.prompts import SYNTAXES
    from diffrt.engine.request import DEFAULT_GUIDANCE, DEFAULT_STEPS, REFINER_AT, Request, default_strength

    demo = DEMO_DEFAULTS

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
    add_lora_flag(p, "merge a LoRA (.safetensors) into the weights at SCALE (default 1) before export; repeatable")
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
    p.add_argument(
        "--prompt-chunks",
        type=int,
        default=SDShapes.max_chunks,
        metavar="K",
        help=f"longest prompt the UNet takes, in chunks of 75 tokens (default {SDShapes.max_chunks}: 225 tokens); "
        "longer prompts keep their first K chunks",
    )
    p.add_argument(
        "--graph-cache",
        type=Path,
        metavar="DIR",
        help="reuse graphs exported before from the same weights, and keep this export's there (a full copy of "
        "each graph; default $DIFFRT_GRAPH_CACHE, else none)",
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
    p.add_argument(
        "--prompt-syntax",
        choices=SYNTAXES,
        help="a1111 (default): (word:1.3), (word), [word], BREAK as A1111 reads them; plain: the text as it is",
    )
    p.add_argument(
        "--clip-skip",
        type=int,
        metavar="N",
        help="A1111's Clip skip: 1 the text encoder's last layer (default), 2 the one before, ... "
        "(diffusers' clip_skip is N - 1)",
    )
    p.add_argument(
        "--steps",
        type=int,
        help=f"sampling steps (default: the bundle's, {DEFAULT_STEPS}; demo: {demo['num_inference_steps']})",
    )
    p.add_argument(
        "--guidance",
        type=float,
        help=f"classifier-free guidance scale, <= 1: off (default: the bundle's, {DEFAULT_GUIDANCE:g}; "
        f"demo: {demo['guidance_scale']:g})",
    )
    p.add_argument(
        "--scheduler",
        help="sampler (default: the bundle's, i.e. lcm for LCM, the checkpoint's for Turbo, else dpmpp_2m_karras; "
        f"demo: {demo['scheduler']}): ddim, pndm, euler, euler_a, heun, lms, "
        "dpmpp_2m, dpmpp_2m_karras, dpmpp_2m_sde_karras, unipc, lcm (or their diffusers/A1111 names)",
    )
    p.add_argument("--seed", type=int, help=f"image i draws from seed + i (default {Request.seed})")
    p.add_argument(
        "--size", type=_size, metavar="WxH", help="image size (default: the native size; --image alone: its size)"
    )
    p.add_argument("--num-images", type=int)
    job = p.add_argument_group("image to image and inpainting (diffusers' names and defaults)")
    job.add_argument("--image", type=Path, metavar="FILE", help="init image (PNG, JPEG, WebP): image to image")
    job.add_argument("--mask", type=Path, metavar="FILE", help="with --image: inpaint where the mask is white")
    job.add_argument(
        "--strength",
        type=float,
        help="share of the schedule run on the init image, (0, 1] (default: image to image "
        f"{default_strength('sd1', False):g}, SDXL {default_strength('sdxl', False):g}; inpainting "
        f"{default_strength('sd1', True):g}, SDXL {default_strength('sdxl', True):g})",
    )
    job.add_argument("--paste-back", action="store_true", help="inpainting: paste the unmasked original back")
    job.add_argument(
        "--mask-blur",
        type=int,
        metavar="PX",
        help=f"blur of the paste-back mask in pixels (default {Request.mask_blur})",
    )
    add_embedding_flags(p)
    add_lora_flags(p)
    add_hires_flags(p)
    refine = p.add_argument_group("SDXL base -> refiner")
    refine.add_argument("--refiner", type=Path, metavar="BUNDLE", help="an SDXL bundle that finishes the schedule")
    refine.add_argument(
        "--refiner-at", type=float, metavar="F", help=f"share of the schedule the base runs (default {REFINER_AT})"
    )
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
    p.add_argument("--steps", type=int, help="sampling steps (default: the bundle's)")
    p.add_argument("--size", type=_size, metavar="WxH", help="image size (default: native)")
    p.add_argument("--batch", type=int, default=1, help="images per call")
    p.add_argument("--scheduler", help="sampler (default: the bundle's)")
    p.add_argument("--guidance", type=float, help="guidance scale (default: the bundle's)")
    p.add_argument("--prompt", help="the prompt to time (a long one times the UNet on several 77-token chunks)")
    p.add_argument("--prompt-syntax", choices=SYNTAXES, help="a1111 (default) or plain")
    p.add_argument("--clip-skip", type=int, metavar="N", help="A1111's Clip skip (default: the bundle's, 1)")
    p.add_argument("--embeddings", type=Path, metavar="DIR", help="textual inversion embeddings the prompt may call")
    add_lora_flags(p)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--no-upscale", action="store_true")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the report with the environment as JSON")
    add_hires_flags(p)
    p.set_defaults(func=cmd_bench)

    add_build_parser(sub)

    from diffrt.serve.cli import add_serve_parser

    add_serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    # diffrt's own lines go to stderr as plain messages; a fresh handler per call follows sys.stderr, and is
    # removed on return (main() may be called in-process, where that stderr may not outlive the call).
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
    finally:
        log.removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
