"""TensorRT plans from a bundle's FP16 ONNX graphs: profiles, cache keys, plan records, and the builder.

Plans live in `bundle/trt/<key>/` (`key.json` = the ingredients the key hashes, `<component>.plan`,
`timing.cache`); the key changes with anything that makes a plan invalid, so a plan under its key is never
stale. Everything above "TensorRT (thin)" is pure (no TensorRT, no GPU) and tested on CPU; `build_bundle`
(what `diffrt build` runs) decides what to reuse and calls `build_plans` for the rest.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

from diffrt.bundle import ModelInfo, load_manifest
from diffrt.engine.trt_env import Environment, current_environment, import_tensorrt, trt_logger
from diffrt.errors import BadInput
from diffrt.specs import ComponentSpec, DimRange

log = logging.getLogger(__name__)
PLAN_SCHEMA = 1  # bump when the layout of trt/<key>/ changes: old plans then miss their key
Span = tuple[int, int]  # (min, max)
Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max) shape


@dataclass(frozen=True)
class BuildOptions:
    profile: Literal["static", "dynamic"] = "static"  # static: min=opt=max, kernels tuned for exactly one shape
    height: Span | None = None  # image height in pixels; None: native size (static) or the bundle's range (dynamic)
    width: Span | None = None  # image width in pixels, like height
    batch: Span | None = None  # images per call; None: 1 (static) or the bundle's range (dynamic)
    guidance: bool = True  # classifier-free guidance: text encoder and UNet see 2 x images
    opt_level: int = 3  # builder_optimization_level 0-5: higher tries more tactics and builds longer
    workspace_gb: float | None = None  # tactic scratch memory limit; None: TensorRT's default (the GPU's memory)

    def __post_init__(self) -> None:
        if self.profile not in ("static", "dynamic"):
            raise BadInput(f"--profile must be static or dynamic, got {self.profile!r}")
        spans = (("--height", self.height), ("--width", self.width), ("--batch", self.batch))
        for flag, span in ((f, s) for f, s in spans if s is not None):
            if not 1 <= span[0] <= span[1]:
                raise BadInput(f"{flag} {span[0]}-{span[1]} is not a range of positive numbers MIN-MAX")
            if self.profile == "static" and span[0] != span[1]:
                raise BadInput(
                    f"--profile static takes one {flag} value, got {span[0]}-{span[1]}; "
                    "use --profile dynamic for a range"
                )
        if not 0 <= self.opt_level <= 5:
            raise BadInput(f"--opt-level must be 0-5, got {self.opt_level}")
        if self.workspace_gb is not None and not self.workspace_gb > 0:
            raise BadInput(f"--workspace must be a positive number of GB, got {self.workspace_gb}")


# ---- profiles ---------------------------------------------------------------------------------------------


def span_text(span: Span) -> str:
    """`512` or `256-768`: how the CLI writes a span."""
    return f"{span[0]}" if span[0] == span[1] else f"{span[0]}-{span[1]}"


def _batch_range(spec: ComponentSpec, r: DimRange, options: BuildOptions, model: ModelInfo) -> DimRange:
    # negative + positive rows go through CFG-batched components (unless the bundle's guidance is an input)
    k = 2 if options.guidance and model.classifier_free_guidance and spec.cfg_batched else 1
    if r.max == 1:  # called once per generation whatever its image count (the VAE encoder)
        return r
    span = options.batch or ((1, 1) if options.profile == "static" else None)
    if span is None:
        return DimRange(r.min, min(max(k, r.min), r.max), r.max)
    lo, hi = span[0] * k, span[1] * k
    if lo < r.min or hi > r.max:
        raise BadInput(
            f"--batch {span_text(span)} images means a {spec.name} batch of {span_text((lo, hi))}, outside the "
            f"bundle's [{r.min}, {r.max}]; use fewer images or re-export"
        )
    return DimRange(lo, lo, hi)


def _latent_range(spec: ComponentSpec, dim: str, r: DimRange, options: BuildOptions, model: ModelInfo) -> DimRange:
    f = model.vae_scale_factor
    flag, span = ("--height", options.height) if dim == "latent_height" else ("--width", options.width)
    span = span or ((model.default_size,) * 2 if options.profile == "static" else None)
    if span is None:
        return r
    multiple = f * dict(spec.multiples).get(dim, 1)
    for v in span:
        if v % multiple:
            raise BadInput(f"{flag} {v} must be a multiple of {multiple} pixels for this bundle")
    lo, hi = span[0] // f, span[1] // f
    if lo < r.min or hi > r.max:
        raise BadInput(
            f"{flag} {span_text(span)} is outside this bundle's range [{r.min * f}, {r.max * f}] "
            "pixels; choose sizes in range or re-export with --image-range"
        )
    return DimRange(lo, min(max(r.opt, lo), hi), hi)


def dim_ranges(spec: ComponentSpec, options: BuildOptions, model: ModelInfo) -> dict[str, DimRange]:
    """Each symbolic dim's (min, opt, max) for one build: the requested sizes, or the spec's ranges."""
    if spec.tiled:  # shapes are tiles, not the image: profiles always span the spec's ranges
        return spec.dim_ranges
    out = {}
    for dim, r in spec.dim_ranges.items():
        if dim == "batch":
            out[dim] = _batch_range(spec, r, options, model)
        elif dim in ("latent_height", "latent_width"):
            out[dim] = _latent_range(spec, dim, r, options, model)
        elif dim == "text_chunks":  # every prompt length in every plan: a long prompt never needs another build
            out[dim] = r
        else:
            out[dim] = r if options.profile == "dynamic" else DimRange(r.opt, r.opt, r.opt)
    return out


def profile_shapes(spec: ComponentSpec, options: BuildOptions, model: ModelInfo) -> Profile:
    """The optimization profile of one component: input name -> (min, opt, max) shape."""
    ranges = dim_ranges(spec, options, model)
    pick = {k: {d: getattr(r, k) for d, r in ranges.items()} for k in ("min", "opt", "max")}
    return {t.name: tuple(spec.shape(t, pick[k]) for k in ("min", "opt", "max")) for t in spec.inputs}


def covers(profile: dict, shapes: dict[str, Shape]) -> bool:
    """Whether every requested input shape lies inside the profile's [min, max] (JSON lists accepted)."""
    for n, s in shapes.items():
        lo, _, hi = profile.get(n, ((), (), ()))
        if len(s) != len(lo) or not all(a <= x <= b for a, x, b in zip(lo, s, hi)):
            return False
    return True


# ---- cache keys -------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)
    return h.hexdigest()


def onnx_sha256(path: Path) -> str:
    """Content hash of an ONNX graph and its external weights (`<name>.data`, written above 2 GB)."""
    parts = [Path(path), Path(path).with_name(Path(path).name + ".data")]
    h = hashlib.sha256()
    for p in parts:
        if p.is_file():
            st = p.stat()  # memo on size + mtime: a multi-GB UNet is hashed once per process
            h.update(f"{p.name}:{_sha256(str(p.resolve()), st.st_size, st.st_mtime_ns)}".encode())
    return h.hexdigest()


def _jsonable(x):
    return json.loads(json.dumps(x))  # tuples -> lists, so computed and recorded ingredients compare equal


def plan_ingredients(env: Environment, options: BuildOptions, components: dict[str, tuple[str, Profile]]) -> dict:
    """Everything a set of plans depends on; components: name -> (ONNX sha256, profile)."""
    parts = {k: {"onnx_sha256": sha, "profile": prof} for k, (sha, prof) in components.items()}
    return _jsonable({"schema": PLAN_SCHEMA, **asdict(env), "options": asdict(options), "components": parts})


def plan_key(ingredients: dict) -> str:
    """Short stable hash of the ingredients: the plan directory's name."""
    return hashlib.sha256(json.dumps(ingredients, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def component_ingredients(ingredients: dict, name: str) -> dict | None:
    """What one component's plan depends on: the environment, the options, its ONNX and its profile."""
    if name not in ingredients.get("components", {}):
        return None
    return {**{k: v for k, v in ingredients.items() if k != "components"}, "component": ingredients["components"][name]}


@dataclass(frozen=True)
class PlanRecord:
    dir: Path  # bundle/trt/<key>
    ingredients: dict  # key.json

    @property
    def key_matches(self) -> bool:  # a hand-edited or truncated key.json no longer hashes to its directory
        return plan_key(self.ingredients) == self.dir.name

    def plan(self, name: str) -> Path:
        return self.dir / f"{name}.plan"

    def profile(self, name: str) -> dict:
        return self.ingredients["components"][name]["profile"]

    @property
    def options(self) -> BuildOptions:  # JSON lists back to (min, max) tuples
        return BuildOptions(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in self.ingredients["options"].items()}
        )


def read_plan_records(bundle: Path) -> list[PlanRecord]:
    """Every `trt/<key>/key.json` of a bundle, newest first; unreadable ones are skipped with a warning."""
    records = []
    for path in sorted((Path(bundle) / "trt").glob("*/key.json"), key=lambda p: -p.stat().st_mtime_ns):
        try:
            records.append(PlanRecord(path.parent, json.loads(path.read_text())))
        except (OSError, ValueError) as e:
            log.warning("ignoring %s: %s", path, e)
    return records


def stale_reason(record: PlanRecord, env: Environment, name: str, onnx_sha: str) -> str | None:
    """Why a recorded plan cannot serve this environment and ONNX graph, or None when it can."""
    got = record.ingredients
    if not record.key_matches or got.get("schema") != PLAN_SCHEMA:
        return f"{record.dir}/key.json does not match its key (edited, or written by another diffrt)"
    if got.get("tensorrt") != env.tensorrt:
        return f"built with TensorRT {got.get('tensorrt')}, this is TensorRT {env.tensorrt}"
    if (got.get("gpu"), got.get("compute_capability")) != (env.gpu, env.compute_capability):
        return (
            f"built for {got.get('gpu')} (compute {got.get('compute_capability')}), "
            f"this GPU is {env.gpu} (compute {env.compute_capability})"
        )
    if name not in got.get("components", {}):
        return f"has no {name} plan"
    if got["components"][name].get("onnx_sha256") != onnx_sha:
        return f"the {name} ONNX graph changed since the plan was built"
    if not record.plan(name).is_file():
        return f"{record.plan(name).name} is missing (the build did not finish)"
    return None


def describe_profile(profile: Profile) -> str:
    """`sample 2x4x64x64, timestep 2` for a static profile, `min..opt..max` per input otherwise."""
    text = {n: ["x".join(map(str, s)) for s in shapes] for n, shapes in profile.items()}
    return ", ".join(f"{n} {lo}" if lo == hi else f"{n} {lo}..{opt}..{hi}" for n, (lo, opt, hi) in text.items())


def build_command(bundle: Path | str, options: BuildOptions) -> str:
    """The `diffrt build` line that makes plans with these options (the CLI parses it back: a tested round trip)."""
    parts, default = ["diffrt", "build", str(bundle)], BuildOptions()
    for f in fields(BuildOptions):
        v = getattr(options, f.name)
        if v == getattr(default, f.name):
            continue
        if f.name == "guidance":
            parts.append("--no-guidance")
            continue
        parts += ["--" + f.name.removesuffix("_gb").replace("_", "-"), span_text(v) if isinstance(v, tuple) else f"{v}"]
    return " ".join(parts)


def select_plans(bundle: Path, env: Environment, name: str, onnx_sha: str) -> list[PlanRecord]:
    """The plans that may run component `name` here; a one-line BadInput with a rebuild hint when none can."""
    records = read_plan_records(bundle)
    usable = [r for r in records if stale_reason(r, env, name, onnx_sha) is None]
    if usable:
        return usable
    if not records:
        raise BadInput(f"{bundle} has no TensorRT plans; build them with `diffrt build {bundle}`")
    r = records[0]
    hint = build_command(bundle, r.options) if name in r.ingredients.get("components", {}) else f"diffrt build {bundle}"
    raise BadInput(
        f"{name}: the TensorRT plans in {bundle}/trt cannot be used "
        f"({stale_reason(r, env, name, onnx_sha)}); rebuild with `{hint}`"
    )


def choose_plan(records: list[PlanRecord], name: str, shapes: dict[str, Shape]) -> PlanRecord | None:
    """The plan whose profile covers the request, preferring an opt shape nearest to it, then the tightest."""

    def score(r: PlanRecord) -> tuple[int, int]:
        prof = r.profile(name)
        near = sum(abs(o - s) for n, shape in shapes.items() for o, s in zip(prof[n][1], shape))
        return near, sum(b - a for lo, _, hi in prof.values() for a, b in zip(lo, hi))

    fits = [r for r in records if covers(r.profile(name), shapes)]
    return min(fits, key=score) if fits else None


# ---- TensorRT (thin) --------------------------------------------------------------------------------------


def needs_strongly_typed_flag(version: str) -> bool:
    """TensorRT 10 builds strongly typed networks only when asked; 11 always does and deprecates the flag."""
    return int(version.split(".")[0]) < 11


def parser_failure(name: str, path: Path, errors: list[tuple[str, str, str, int]]) -> str:
    """One line naming each ONNX parser error by node: (description, node name, operator, node index)."""
    each = "; ".join(f"node {i} {node!r} ({op}): {desc}" for desc, node, op, i in errors) or "no details"
    return f"{name}: TensorRT cannot parse {path.name}: {each}; re-export the bundle or report the operator"


def build_failure(name: str, options: BuildOptions) -> str:
    ws = f"{options.workspace_gb:g} GB" if options.workspace_gb else "TensorRT's default"
    return (
        f"{name}: TensorRT could not build an engine (its errors are logged above); if the GPU ran out of "
        f"memory, lower --workspace (now {ws}), --batch, or the shape range (--profile static, narrower "
        "--height/--width), or close other GPU processes"
    )


def _build_plan(trt, builder, logger, name: str, path: Path, shapes: Profile, options, timing_cache) -> bytes:
    flags = 0
    if needs_strongly_typed_flag(trt.__version__):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    parser.set_flag(trt.OnnxParserFlag.NATIVE_INSTANCENORM)
    if not parser.parse_from_file(str(path)):
        errors = []
        for i in range(parser.num_errors):
            parser_error = parser.get_error(i)
            errors.append(
                (parser_error.desc(), parser_error.node_name(), parser_error.node_operator(), parser_error.node())
            )
        raise BadInput(parser_failure(name, path, errors))
    inputs = {t.name: tuple(t.shape) for t in (network.get_input(i) for i in range(network.num_inputs))}
    if set(inputs) != set(shapes):
        raise BadInput(f"{name}: {path.name} has inputs {sorted(inputs)}, the manifest {sorted(shapes)}; re-export")
    config = builder.create_builder_config()
    opt_profile = builder.create_optimization_profile()
    for tensor, (lo, opt, hi) in shapes.items():
        if -1 in inputs[tensor]:  # fixed inputs (the text encoder's clip_skip) take no profile
            opt_profile.set_shape(tensor, lo, opt, hi)
    config.add_optimization_profile(opt_profile)
    if options.workspace_gb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gb * 2**30))
    config.builder_optimization_level = options.opt_level
    if not config.set_timing_cache(timing_cache, ignore_mismatch=False):
        log.warning("%s: the timing cache was made on another GPU or TensorRT; building without it", name)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BadInput(build_failure(name, options))
    return bytes(plan)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # a reader never sees half a plan


def build_plans(
    jobs: dict[str, tuple[Path, Profile]], options: BuildOptions, out: Path, cache: Path, seed: Path | None = None
) -> None:
    """Build `out/<name>.plan` per job (name -> ONNX path, profile), sharing one timing cache saved to `cache`."""
    trt = import_tensorrt()
    logger = trt_logger()
    builder = trt.Builder(logger)
    config = builder.create_builder_config()
    timing_cache = config.create_timing_cache(seed.read_bytes() if seed else b"")
    for name, (path, shapes) in jobs.items():
        log.info("%s: building (%s: %s; opt level %d)", name, options.profile, describe_profile(shapes),
                 options.opt_level)  # fmt: skip
        t0 = time.perf_counter()
        plan = _build_plan(trt, builder, logger, name, path, shapes, options, timing_cache)
        _write_atomic(out / f"{name}.plan", plan)
        _write_atomic(cache, bytes(timing_cache.serialize()))  # keep tactic timings even if a later build fails
        log.info("%s: built in %.1f s (%.0f MB plan)", name, time.perf_counter() - t0, len(plan) / 2**20)


# ---- diffrt build ---------------------------------------------------------------------------------------------


def reuse_decision(records: list[PlanRecord], ingredients: dict, name: str) -> tuple[Path | None, str]:
    """(plan to reuse or None to build, why): reuse one whose environment, options, ONNX and profile are the same,
    under this key or another (re-exporting one component then rebuilds only that one)."""
    want = component_ingredients(ingredients, name)
    for r in records:
        if r.key_matches and component_ingredients(r.ingredients, name) == want and r.plan(name).is_file():
            where = "" if r.dir.name == plan_key(ingredients) else f" from trt/{r.dir.name}"
            return r.plan(name), f"reusing plan{where}: same ONNX, TensorRT, GPU, profile and options"
    return None, "building: no plan with these ingredients yet"


def timing_seed(records: list[PlanRecord], env: Environment) -> Path | None:
    """A timing cache from a sibling build on the same TensorRT and GPU: tactic timings carry across shapes."""
    same = [r.dir / "timing.cache" for r in records if r.ingredients.get("tensorrt") == env.tensorrt
            and r.ingredients.get("gpu") == env.gpu]  # fmt: skip
    return next((p for p in same if p.is_file()), None)


def check_build(bundle: Path | str, options: BuildOptions) -> None:
    """Option and size mistakes, found without TensorRT or a GPU: every component's profile must fit the bundle."""
    manifest = load_manifest(bundle)
    for entry in manifest.components.values():
        profile_shapes(entry.spec, options, manifest.model)


def build_bundle(bundle: Path | str, options: BuildOptions, timing_cache: Path | None = None) -> Path:
    """Plans for every component under bundle/trt/<key>/, reusing matching ones; returns that directory."""
    bundle = Path(bundle)
    manifest, env = load_manifest(bundle), current_environment()
    parts = {}
    for name, entry in manifest.components.items():
        if "fp16" not in entry.files:
            raise BadInput(f"{bundle}: {name} has no FP16 graph, which TensorRT builds from; re-export the bundle")
        shapes = profile_shapes(entry.spec, options, manifest.model)
        parts[name] = (onnx_sha256(bundle / entry.files["fp16"]), shapes)
    ingredients = plan_ingredients(env, options, parts)
    out, records = bundle / "trt" / plan_key(ingredients), read_plan_records(bundle)
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
        build_plans(jobs, options, out, cache, cache if cache.is_file() else timing_seed(records, env))
    log.info("TensorRT plans in %s (%d built, %d reused)", out, len(jobs), len(parts) - len(jobs))
    return out
