"""`diffrt export`: checkpoint (+ upscaler) -> validated FP32/FP16 ONNX bundle, written atomically."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx

from diffrt import __version__
from diffrt.bundle import (
    LORA_COMPONENTS,
    TOKENIZER,
    TOKENIZER_2,
    ComponentEntry,
    Manifest,
    ModelInfo,
    UpscalerInfo,
    token_table,
    weight_map,
)
from diffrt.errors import BadInput, ValidationFailed
from diffrt.export import graph_cache
from diffrt.export.checkpoint import Checkpoint, check_source, load_checkpoint
from diffrt.export.fp16 import convert_to_fp16
from diffrt.export.onnx_export import TextEncoder, UNet, VAEDecoder, VAEEncoder, export_onnx, save_onnx
from diffrt.export.tokenizer import export_tokenizer
from diffrt.export.validate import HEADER, Check, validate_component
from diffrt.export.weight_map import bake_loras, externalize, write_weight_map
from diffrt.specs import MAX_CLIP_SKIP, SDShapes, sd_specs, upscaler_spec

log = logging.getLogger("diffrt.export")
UPSCALER_TILE, UPSCALER_OVERLAP = 128, 16
MAX_PROMPT_CHUNKS = 8  # 616 tokens of cross-attention: past A1111's usual prompts, and a bounded TensorRT profile


@dataclass(frozen=True)
class ExportOptions:
    opset: int = 18  # the dynamo exporter's native opset; TensorRT 10/11 parse it
    validate: bool = True
    force: bool = False  # replace an existing bundle
    prediction_type: str | None = None  # override the checkpoint's scheduler (single files do not say)
    tokenizer: Path | None = None  # tokenizer folder for single-file checkpoints
    image_range: tuple[int, int, int] | None = None  # (min, opt, max) image side; default from the checkpoint
    prompt_chunks: int = SDShapes.max_chunks  # longest prompt the UNet takes, in 75-token chunks
    defaults: dict | None = None  # generation defaults recorded in the manifest (see Manifest.defaults)
    loras: tuple[tuple[Path, float], ...] = ()  # LoRAs merged into the weights before export (file, scale)
    # graphs exported before from the same weights are reused from here (diffrt.export.graph_cache)
    graph_cache: Path | None = field(default_factory=lambda: _env_path(graph_cache.ENV))


def _env_path(name: str) -> Path | None:
    return Path(os.environ[name]) if os.environ.get(name) else None


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Log a stage's start and its wall time (the CLI shows these on stderr)."""
    log.info("%s ...", name)
    start = time.perf_counter()
    yield
    log.info("%s done in %.1f s", name, time.perf_counter() - start)


def sd_shapes(
    ckpt: Checkpoint,
    max_length: int,
    image_range: tuple[int, int, int] | None,
    prompt_chunks: int = SDShapes.max_chunks,
) -> SDShapes:
    unet, vae = ckpt.unet.config, ckpt.vae.config
    te = ckpt.text_encoder.config if ckpt.text_encoder is not None else None  # None: the SDXL refiner
    te2 = ckpt.text_encoder_2.config if ckpt.text_encoder_2 is not None else None
    width = (te.hidden_size if te else 0) + (te2.hidden_size if te2 else 0)
    if width != unet.cross_attention_dim:
        raise BadInput(
            f"text encoder width {width} does not match the UNet's cross-attention width "
            f"{unet.cross_attention_dim}; the checkpoint's components do not belong together"
        )
    pooled = te2.projection_dim if te2 else 0
    time_ids = 0
    if unet.addition_embed_type == "text_time":
        added = unet.projection_class_embeddings_input_dim - pooled  # one embedding per micro-condition
        if not te2 or added <= 0 or added % unet.addition_time_embed_dim:
            raise BadInput(
                f"the UNet's added-condition width {unet.projection_class_embeddings_input_dim} does not fit the "
                f"text encoder's pooled width {pooled}; the checkpoint's components do not belong together"
            )
        time_ids = added // unet.addition_time_embed_dim
    vae_scale = 2 ** (len(vae.block_out_channels) - 1)
    step = vae_scale * 2 ** (len(unet.block_out_channels) - 1)
    opt = unet.sample_size * vae_scale
    lo, opt, hi = image_range or (max(step, opt // 2 // step * step), opt, opt * 2)
    if not (lo <= opt <= hi) or any(v % step for v in (lo, opt, hi)):
        raise BadInput(f"image size range {lo}..{opt}..{hi} must be ordered multiples of {step} for this checkpoint")
    return SDShapes(
        vocab_size=te.vocab_size if te else 0,
        max_length=max_length,
        text_hidden=te.hidden_size if te else 0,
        latent_channels=vae.latent_channels,
        unet_out_channels=unet.out_channels,
        vae_scale_factor=vae_scale,
        unet_downsamples=len(unet.block_out_channels) - 1,
        image_opt=opt,
        image_min=lo,
        image_max=hi,
        text_hidden_2=te2.hidden_size if te2 else 0,
        vocab_size_2=te2.vocab_size if te2 else 0,
        pooled_dim=pooled,
        time_ids=time_ids,
        time_cond_dim=unet.time_cond_proj_dim or 0,
        unet_in_channels=unet.in_channels,
        max_chunks=prompt_chunks,
        clip_skips=clip_skips(te, xl=te2 is not None) if te else 0,
        clip_skips_2=clip_skips(te2, xl=True) if te2 else 0,
    )


def clip_skips(config, xl: bool) -> int:
    """Hidden states a text encoder's clip skip can pick: from the usual one (the last layer; SDXL's
    penultimate) back to the token embeddings, at most A1111's 12."""
    return min(MAX_CLIP_SKIP, config.num_hidden_layers + (0 if xl else 1))


def _tools() -> dict[str, str]:
    out = {"diffrt": __version__}
    for dist in ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "spandrel"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out


def export_component(
    module, spec, tmp: Path, opts: ExportOptions, fp32_attention: bool, fp16: bool = True
) -> tuple[dict, list[Check]]:
    """Export, convert and validate one component. Without `fp16` the FP16 bundle uses the FP32 graph."""
    files = {"fp32": f"onnx/{spec.name}.fp32.onnx", "fp16": f"onnx/{spec.name}.fp16.onnx"}
    if not fp16:
        files["fp16"] = files["fp32"]
    lora = spec.name in LORA_COMPONENTS  # weights in external data, and a map of them (diffrt.export.weight_map)
    key = graph_cache.graph_key(module, spec, opts.opset, fp32_attention, fp16, lora) if opts.graph_cache else None
    if key is None or not graph_cache.fetch(opts.graph_cache, key, spec.name, tmp):
        _export_graphs(module, spec, tmp, files, opts.opset, fp32_attention, fp16)
        if lora:
            for f in set(files.values()):
                externalize(tmp / f)
    if lora:
        with stage(f"{spec.name}: map the weights LoRAs change"):
            write_weight_map(module, {p: tmp / f for p, f in files.items()}, tmp / weight_map(spec.name))
    checks: list[Check] = []
    if opts.validate:
        with stage(f"{spec.name}: validate against torch"):
            graphs = {p: tmp / f for p, f in files.items() if p == "fp32" or f != files["fp32"]}
            checks = validate_component(module, spec, graphs)
    if key is not None and all(c.passed for c in checks):
        graph_cache.store(opts.graph_cache, key, spec.name, tmp)
    gc.collect()
    return files, checks


def _export_graphs(module, spec, tmp: Path, files: dict[str, str], opset: int, fp32_attention: bool, fp16: bool):
    with stage(f"{spec.name}: export fp32 ONNX"):
        export_onnx(module, spec, tmp / files["fp32"], opset)
    if not fp16:
        log.info("%s: kept in FP32 in the FP16 bundle (the checkpoint asks for it: force_upcast)", spec.name)
        return
    with stage(f"{spec.name}: convert to fp16"):
        model = onnx.load(str(tmp / files["fp32"]))
        onnx.checker.check_model(str(tmp / files["fp32"]))
        half = convert_to_fp16(model, fp32_attention=fp32_attention)
        del model
        save_onnx(half, tmp / files["fp16"])
        del half
        onnx.checker.check_model(str(tmp / files["fp16"]))


@dataclass(frozen=True)
class ExportResult:
    manifest: Manifest
    checks: list[Check]  # validation rows; empty with --no-validate


def export_bundle(
    source: str, out: Path, upscaler: Path | None = None, opts: ExportOptions = ExportOptions()
) -> ExportResult:
    """Export SOURCE (+ upscaler) to the bundle directory OUT; nothing is left at OUT unless it all succeeded."""
    out = Path(out)
    if out.exists() and not opts.force:
        raise BadInput(f"{out} already exists; pass --force to replace it or choose another -o")
    check_source(source)
    if not 1 <= opts.prompt_chunks <= MAX_PROMPT_CHUNKS:
        raise BadInput(f"--prompt-chunks {opts.prompt_chunks} must be 1 to {MAX_PROMPT_CHUNKS} (75 tokens each)")
    if upscaler is not None and not Path(upscaler).is_file():
        raise BadInput(f"upscaler {upscaler} does not exist; pass a .pth or .safetensors ESRGAN-family file")
    loaded_upscaler = None
    if upscaler is not None:  # first: it is quick, and a bad file should not wait for a big checkpoint
        from diffrt.export.upscaler import load_upscaler

        with stage("load upscaler"):
            loaded_upscaler = load_upscaler(Path(upscaler))
    for path, _ in opts.loras:  # before the checkpoint: a missing file should not wait for it
        if not Path(path).is_file():
            raise BadInput(f"LoRA {path} does not exist")
    with stage("load checkpoint"):
        ckpt = load_checkpoint(source, prediction_type=opts.prediction_type, tokenizer=opts.tokenizer)
    if opts.loras:
        with stage("merge LoRAs"):
            _bake_loras(ckpt, opts.loras)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        result = _write(ckpt, loaded_upscaler, tmp, opts)
        _publish_permissions(tmp)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("bundle written to %s", out)
    return result


def _bake_loras(ckpt: Checkpoint, loras: tuple[tuple[Path, float], ...]) -> None:
    """Merge the LoRAs into the checkpoint's weights; the manifest's source then names them, and its hash (which
    PNG metadata and plan keys read) is the checkpoint's and theirs together."""
    models = {name: getattr(ckpt, name) for name in LORA_COMPONENTS if getattr(ckpt, name) is not None}
    records = bake_loras(models, list(loras))
    digest = hashlib.sha256(ckpt.source.get("sha256", "").encode())
    for r in records:
        digest.update(f"{r['hash']}:{r['scale']!r}".encode())
    ckpt.source = {**ckpt.source, "base_sha256": ckpt.source.get("sha256"), "sha256": digest.hexdigest(),
                   "loras": records}  # fmt: skip


def _publish_permissions(folder: Path) -> None:
    """mkdtemp makes the folder private and onnx writes weight files 0600: give the bundle normal modes."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _write(ckpt: Checkpoint, upscaler, tmp: Path, opts: ExportOptions) -> ExportResult:
    with stage("tokenizer"):
        tokenizer = tokenizer_2 = None
        if ckpt.tokenizer_dir is not None:
            tokenizer = export_tokenizer(ckpt.tokenizer_dir, (tmp / TOKENIZER).parent)
        if ckpt.tokenizer_2_dir is not None:
            tokenizer_2 = export_tokenizer(ckpt.tokenizer_2_dir, (tmp / TOKENIZER_2).parent)
    shapes = sd_shapes(ckpt, (tokenizer or tokenizer_2).max_length, opts.image_range, opts.prompt_chunks)
    specs = sd_specs(shapes)
    upcast = bool(getattr(ckpt.unet.config, "upcast_attention", False))
    xl = ckpt.text_encoder_2 is not None
    unet_extra = tuple(t.name for t in specs["unet"].inputs[3:])
    modules = {}  # name -> (module, FP32 attention, FP16 graph)
    if ckpt.text_encoder is not None:  # all but the SDXL refiner
        encoder = TextEncoder(ckpt.text_encoder, hidden_layer=-2 if xl else -1, skips=shapes.clip_skips)
        modules["text_encoder"] = (encoder, False, True)
    if xl:  # SDXL conditions on both encoders' penultimate layer, and on the second one's pooled projection
        encoder = TextEncoder(ckpt.text_encoder_2, hidden_layer=-2, pooled=True, skips=shapes.clip_skips_2)
        modules["text_encoder_2"] = (encoder, False, True)
    modules["unet"] = (UNet(ckpt.unet, unet_extra), upcast, True)
    # SDXL's VAE overflows FP16 (docs/models.md): where an SDXL checkpoint says so (force_upcast, which only
    # diffusers' SDXL pipelines read), its decoder stays FP32 in the FP16 bundle
    vae_fp16 = not (xl and getattr(ckpt.vae.config, "force_upcast", True))
    modules["vae_encoder"] = (VAEEncoder(ckpt.vae), False, vae_fp16)
    modules["vae_decoder"] = (VAEDecoder(ckpt.vae), False, vae_fp16)
    upscaler_info = None
    if upscaler is not None:
        specs["upscaler"] = upscaler_spec(upscaler.scale, UPSCALER_TILE, upscaler.size_multiple)
        modules["upscaler"] = (upscaler.module, False, True)
        upscaler_info = UpscalerInfo(
            upscaler.architecture, upscaler.scale, UPSCALER_TILE, UPSCALER_OVERLAP, upscaler.size_multiple
        )
    components, checks = {}, []
    for name, (module, fp32_attention, fp16) in modules.items():
        files, component_checks = export_component(module, specs[name], tmp, opts, fp32_attention, fp16)
        if isinstance(module, TextEncoder):  # the runtime looks token embeddings up itself
            (tmp / token_table(name)).parent.mkdir(parents=True, exist_ok=True)
            np.save(tmp / token_table(name), module.table)
        components[name] = ComponentEntry(specs[name], files)
        checks += component_checks
    if checks:
        log.info("validation (ONNX Runtime CPU vs torch FP32):\n%s\n%s", HEADER, "\n".join(c.row() for c in checks))
        failed = [c for c in checks if not c.passed]
        if failed:
            worst = failed[0]
            raise ValidationFailed(
                f"{worst.component} {worst.precision} at {worst.shape} disagrees with torch "
                f"(max abs error {worst.max_abs_error:.3e}, cosine {worst.cosine:.6f}, finite={worst.finite}); "
                "nothing was written — report this with the checkpoint, or pass --no-validate to keep the graphs"
            )
    model = ModelInfo(
        family=ckpt.family,
        prediction_type=ckpt.scheduler_config.get("prediction_type", "epsilon"),
        latent_channels=shapes.latent_channels,
        vae_scale_factor=shapes.vae_scale_factor,
        scaling_factor=float(ckpt.vae.config.scaling_factor),
        default_size=shapes.image_opt,
        force_zeros_for_empty_prompt=ckpt.force_zeros_for_empty_prompt,
        classifier_free_guidance=not shapes.time_cond_dim,
    )
    manifest = Manifest(
        model,
        tokenizer,
        dict(ckpt.scheduler_config),
        components,
        upscaler_info,
        tokenizer_2=tokenizer_2,
        source=ckpt.source,
        tools=_tools(),
        defaults=dict(opts.defaults or {}),
    )
    manifest.save(tmp)
    return ExportResult(manifest, checks)
