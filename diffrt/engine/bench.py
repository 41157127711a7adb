"""`diffrt bench`: per-stage latency of a bundle, warm-up excluded, medians and p90 over timed runs."""

from __future__ import annotations

import json
import os
import platform
import resource
import time
from dataclasses import asdict, dataclass, replace
from importlib import metadata
from pathlib import Path

import numpy as np

from diffrt.engine.hires import HiresOptions
from diffrt.engine.request import Request

BENCH_SCHEMA = 1
PROMPT = "a photograph of an astronaut riding a horse"


@dataclass(frozen=True)
class BenchSettings:
    backend: str = "auto"
    steps: int | None = None  # None: the bundle's default (as every generation setting below)
    width: int | None = None  # None: the bundle's native size
    height: int | None = None
    batch: int = 1  # images per call
    scheduler: str | None = None  # None: the bundle's default sampler
    guidance_scale: float | None = None
    warmup: int = 2  # untimed runs first: session/graph/CUDA-graph set-up and caches
    runs: int = 10
    upscale: bool = True
    threads: int = 0  # ort-cpu intra-op threads, 0 = all cores
    hires: HiresOptions | None = None  # a second pass (hires fix): its stages are reported as hires_*
    prompt: str = PROMPT  # a long one measures the UNet on several 77-token chunks
    prompt_syntax: str = "a1111"
    clip_skip: int | None = None
    embeddings: str | None = None  # a textual inversion folder (Pipeline.load(embeddings=))
    loras: tuple[tuple[str, float], ...] = ()  # LoRAs merged into every run (the switch is timed as lora_switch)
    lora_dir: str | None = None


def stats(values: list[float]) -> dict[str, float]:
    """Median and p90 in milliseconds (p90 by linear interpolation, as numpy's default)."""
    a = np.asarray(values, dtype=np.float64) * 1000
    return {"median_ms": float(np.median(a)), "p90_ms": float(np.percentile(a, 90)), "n": int(a.size)}


def environment(threads: int) -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for dist in ("diffrt", "onnxruntime", "onnxruntime-gpu", "numpy", "tensorrt", "cuda-python"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "threads": threads or os.cpu_count(),
        "versions": versions,
    }


def run_bench(bundle: str | Path, s: BenchSettings, progress=None) -> dict:
    """Load the bundle, run warm-up + timed generations, and return the report (JSON-ready)."""
    t0 = time.perf_counter()
    from diffrt.engine.pipeline import Pipeline

    pipe = Pipeline.load(bundle, backend=s.backend, threads=s.threads, embeddings=s.embeddings, lora_dir=s.lora_dir)
    load_s = time.perf_counter() - t0
    request = Request(
        s.prompt,
        prompt_syntax=s.prompt_syntax,
        clip_skip=s.clip_skip,
        num_inference_steps=s.steps,
        guidance_scale=s.guidance_scale,
        scheduler=s.scheduler,
        height=s.height,
        width=s.width,
        num_images=s.batch,
        upscale=s.upscale,
        output_type="np",
        hires=s.hires,
        loras=s.loras,
    )
    request = pipe.check_request(request)  # the bundle's defaults, reported below
    lora_switch_s = pipe.use_loras(request.loras) if request.loras else None  # merge, make the sessions again
    for i in range(s.warmup):
        pipe.generate(replace(request, seed=tuple(range(i, i + s.batch))))
        if progress:
            progress()
    runs = []
    for i in range(s.runs):
        out = pipe.generate(replace(request, seed=tuple(range(1000 + i, 1000 + i + s.batch))))
        t = dict(out.timings)
        t["unet_steps"] = list(out.unet_times)
        t["host"] = t["denoise"] - t["unet"]  # sampler math, CFG combine, copies between UNet calls
        if "hires_denoise" in t:
            t["hires_host"] = t["hires_denoise"] - t["hires_unet"]
        runs.append(t)
        if progress:
            progress()
    stages = {}
    first = ("tokenizer", "text_encoder", "unet", "host")
    second = ("hires_upscale", "hires_vae_decoder", "hires_upscaler", "hires_vae_encoder", "hires_unet", "hires_host")
    for name in (*first, *second, "vae_decoder", "upscaler", "total"):
        values = [r[name] for r in runs if name in r]
        if values:
            stages[name] = stats(values)
    stages["unet_step"] = stats([x for r in runs for x in r["unet_steps"]])
    models = ("text_encoder", "unet", "vae_decoder", "upscaler", "hires_vae_decoder", "hires_upscaler",
              "hires_vae_encoder", "hires_unet")  # fmt: skip
    model_sum = [sum(r.get(k, 0.0) for k in models) for r in runs]
    overhead = [r["total"] - m for r, m in zip(runs, model_sum)]
    total = stages["total"]["median_ms"] / 1000
    return {
        "schema": BENCH_SCHEMA,
        "bundle": str(bundle),
        "backend": pipe.backend.name,
        "settings": {
            **asdict(s),
            "steps": request.num_inference_steps,
            "guidance_scale": request.guidance_scale,
            "scheduler": request.scheduler,
            "width": request.width,
            "height": request.height,
            "hires": asdict(request.hires) if request.hires else None,
        },
        "environment": environment(s.threads),
        "load_s": load_s,
        "lora_switch_s": lora_switch_s,
        "stages": stages,
        "end_to_end": {**stages["total"], "images_per_s": s.batch / total if total > 0 else 0.0},
        "host_overhead": {**stats(overhead), "share_of_total": float(np.median(overhead)) / total if total else 0},
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_device_mb": getattr(pipe.backend, "peak_device_mb", lambda: None)(),
        "runs": runs,
    }


def format_table(report: dict) -> str:
    s = report["settings"]
    lines = [
        f"diffrt bench  backend={report['backend']}  {s['width']}x{s['height']}  batch={s['batch']}  "
        f"steps={s['steps']}  scheduler={s['scheduler'] or 'bundle default'}  "
        f"runs={s['runs']} (+{s['warmup']} warm-up)"
        + (f"  hires={s['hires']['scale']:g}x {s['hires']['upscaler']}" if s.get("hires") else ""),
        f"{'stage':<14}{'median ms':>12}{'p90 ms':>12}",
    ]
    for name, st in report["stages"].items():
        lines.append(f"{name:<14}{st['median_ms']:>12.2f}{st['p90_ms']:>12.2f}")
    e, h = report["end_to_end"], report["host_overhead"]
    lines += [
        f"end to end: median {e['median_ms']:.1f} ms, p90 {e['p90_ms']:.1f} ms, {e['images_per_s']:.2f} images/s",
        f"host overhead (total - model calls): median {h['median_ms']:.2f} ms = {100 * h['share_of_total']:.2f} %",
        f"bundle load {report['load_s']:.2f} s, peak RSS {report['peak_rss_mb']:.0f} MB"
        + (f", LoRA switch {report['lora_switch_s']:.2f} s" if report.get("lora_switch_s") is not None else "")
        + (f", peak device {report['peak_device_mb']:.0f} MB" if report["peak_device_mb"] else ""),
    ]
    return "\n".join(lines)


def write_json(report: dict, path: Path) -> None:
    Path(path).write_text(json.dumps(report, indent=2) + "\n")
