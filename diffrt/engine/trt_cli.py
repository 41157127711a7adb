"""`diffrt build BUNDLE`: TensorRT plans for a bundle, reused when nothing they depend on changed."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

from diffrt.bundle import load_manifest
from diffrt.engine import trt_build as tb
from diffrt.errors import BadInput

log = logging.getLogger(__name__)


def span(text: str) -> tuple[int, int]:
    """`N` or `MIN-MAX` -> (min, max)."""
    try:
        lo, _, hi = text.partition("-")
        return int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or MIN-MAX, e.g. 512 or 256-768, got {text!r}") from None


def add_build_parser(subparsers) -> argparse.ArgumentParser:
    """Add `build` to the `diffrt` subcommands."""
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


def options_from_args(args: argparse.Namespace) -> tb.BuildOptions:
    return tb.BuildOptions(
        profile=args.profile,
        height=args.height,
        width=args.width,
        batch=args.batch,
        guidance=not args.no_guidance,
        opt_level=args.opt_level,
        workspace_gb=args.workspace,
    )


def reuse_decision(records: list[tb.PlanRecord], ingredients: dict, name: str) -> tuple[Path | None, str]:
    """(plan to reuse or None to build, why): reuse one whose environment, options, ONNX and profile are the same,
    under this key or another (re-exporting one component then rebuilds only that one)."""
    want = tb.component_ingredients(ingredients, name)
    for r in records:
        if r.key_matches and tb.component_ingredients(r.ingredients, name) == want and r.plan(name).is_file():
            where = "" if r.dir.name == tb.plan_key(ingredients) else f" from trt/{r.dir.name}"
            return r.plan(name), f"reusing plan{where}: same ONNX, TensorRT, GPU, profile and options"
    return None, "building: no plan with these ingredients yet"


def timing_seed(records: list[tb.PlanRecord], env: tb.Environment) -> Path | None:
    """A timing cache from a sibling build on the same TensorRT and GPU: tactic timings carry across shapes."""
    same = [r.dir / "timing.cache" for r in records if r.ingredients.get("tensorrt") == env.tensorrt
            and r.ingredients.get("gpu") == env.gpu]  # fmt: skip
    return next((p for p in same if p.is_file()), None)


def build_bundle(bundle: Path | str, options: tb.BuildOptions, timing_cache: Path | None = None) -> Path:
    """Plans for every component under bundle/trt/<key>/, reusing matching ones; returns that directory."""
    from diffrt.engine.trt import current_environment

    bundle = Path(bundle)
    manifest, env = load_manifest(bundle), current_environment()
    parts = {}
    for name, entry in manifest.components.items():
        if "fp16" not in entry.files:
            raise BadInput(f"{bundle}: {name} has no FP16 graph, which TensorRT builds from; re-export the bundle")
        shapes = tb.profile_shapes(entry.spec, options, manifest.model)
        parts[name] = (tb.onnx_sha256(bundle / entry.files["fp16"]), shapes)
    ingredients = tb.plan_ingredients(env, options, parts)
    out, records = bundle / "trt" / tb.plan_key(ingredients), tb.read_plan_records(bundle)
    out.mkdir(parents=True, exist_ok=True)
    (out / "key.json").write_text(json.dumps(ingredients, indent=2, sort_keys=True) + "\n")
    jobs = {}
    for name, entry in manifest.components.items():
        source, why = reuse_decision(records, ingredients, name)
        log.info("%s: %s", name, why)
        if source is None:
            jobs[name] = (bundle / entry.files["fp16"], parts[name][1])
        elif source != out / f"{name}.plan":
            shutil.copyfile(source, out / f"{name}.plan")
    if jobs:
        cache = Path(timing_cache or out / "timing.cache")
        tb.build_plans(jobs, options, out, cache, cache if cache.is_file() else timing_seed(records, env))
    log.info("TensorRT plans in %s (%d built, %d reused)", out, len(jobs), len(parts) - len(jobs))
    return out


def cmd_build(args: argparse.Namespace) -> int:
    from diffrt.engine.trt import available_reason

    options = options_from_args(args)  # option and size mistakes first: they need no GPU to report
    manifest = load_manifest(args.bundle)
    for entry in manifest.components.values():
        tb.profile_shapes(entry.spec, options, manifest.model)
    reason = available_reason()
    if reason:
        raise BadInput(f"diffrt build needs TensorRT and an NVIDIA GPU: {reason}")
    build_bundle(args.bundle, options, args.timing_cache)
    return 0
