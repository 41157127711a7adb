"""A1111's "Hires. fix": a second, image-to-image pass at a larger size over the first pass's result.

The first pass draws at the requested size. Its latents are then brought to the target size — by
interpolating the latents themselves ("Latent" upscalers), or by decoding, upscaling with the bundle's ESRGAN
upscaler, resizing to the exact target (LANCZOS) and encoding again ("esrgan") — and denoised again from the
first kept step of `steps` at `strength`, with fresh noise from the same seeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from diffrt.errors import BadInput

# short name -> A1111's name (what PNG metadata says); "esrgan" is the bundle's upscaler, named by its architecture
UPSCALERS = {
    "latent": "Latent",
    "latent-bicubic": "Latent (bicubic)",
    "latent-nearest": "Latent (nearest)",
    "esrgan": "ESRGAN",
}
_ALIASES = {name.lower(): short for short, name in UPSCALERS.items()}


@dataclass(frozen=True)
class HiresOptions:
    """The second pass. A1111's defaults: 2x, "Latent", the first pass's steps, denoising strength 0.7."""

    scale: float = 2.0  # target side = int(side * scale), down to the UNet's size multiple
    upscaler: str = "latent"  # a key or A1111 name of UPSCALERS
    steps: int | None = None  # None: the first pass's num_inference_steps; int(steps * strength) of them run
    strength: float = 0.7

    def resolved(self, has_upscaler: bool) -> HiresOptions:
        """Checked, with the upscaler's short name; BadInput naming the field (`hires.<name>`) otherwise."""
        s = self.scale
        if isinstance(s, bool) or not isinstance(s, int | float) or not math.isfinite(s) or not 1 <= s <= 4:
            raise BadInput(f"hires.scale must be a number in [1, 4], got {s!r}", "hires")
        up = str(self.upscaler)
        short = up if up in UPSCALERS else _ALIASES.get(up.lower())
        if short is None:
            raise BadInput(f"hires.upscaler {up!r} is unknown; use one of {', '.join(UPSCALERS)}", "hires")
        if short == "esrgan" and not has_upscaler:
            raise BadInput(
                "hires.upscaler esrgan needs a bundle with an upscaler (diffrt export --upscaler); or use latent",
                "hires",
            )
        steps = self.steps
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise BadInput(f"hires.steps must be an integer >= 1, got {steps!r}", "hires")
        st = self.strength
        if isinstance(st, bool) or not isinstance(st, int | float) or not 0 < st <= 1:
            raise BadInput(f"hires.strength must be a number in (0, 1], got {st!r}", "hires")
        return HiresOptions(float(s), short, steps, float(st))


def target_side(side: int, scale: float, multiple: int) -> int:
    """A1111's int(side * scale), rounded down to what the UNet takes."""
    return int(side * scale) // multiple * multiple


def _taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear source indices and weights of torch's interpolate(align_corners=False, antialias=False)."""
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0).astype(np.float32)


def _cubic(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Bicubic source indices (n_out, 4) and weights of torch's interpolate(align_corners=False): Keys' kernel
    with a = -0.75, neighbours clamped at the border."""
    a = -0.75
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5  # not clamped at 0 for the cubic kernel
    base = np.floor(src)
    t = src - base
    idx = np.clip(base[:, None].astype(np.int64) + np.arange(-1, 3), 0, n_in - 1)

    def near(d):  # |d| <= 1
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d):  # 1 < |d| < 2
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    weights = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)
    return idx, weights.astype(np.float32)


def resize_latents(x: np.ndarray, height: int, width: int, mode: str) -> np.ndarray:
    """(B, C, h, w) -> (B, C, height, width): "latent" bilinear, "latent-bicubic" bicubic, "latent-nearest"
    nearest, as torch's interpolate computes them (align_corners=False, no antialiasing)."""
    h, w = x.shape[2:]
    if mode == "latent-bicubic":
        ri, rw = _cubic(h, height)
        ci, cw = _cubic(w, width)
        rows = sum(x[:, :, ri[:, k]] * rw[:, k, None] for k in range(4))  # (B, C, height, w)
        out = sum(rows[:, :, :, ci[:, k]] * cw[None, :, k] for k in range(4))
        return np.ascontiguousarray(out, dtype=np.float32)
    if mode == "latent-nearest":
        rows = np.floor(np.arange(height) * (h / height)).astype(np.int64)
        cols = np.floor(np.arange(width) * (w / width)).astype(np.int64)
        return np.ascontiguousarray(x[:, :, rows][:, :, :, cols])
    r0, r1, wr = _taps(h, height)
    c0, c1, wc = _taps(w, width)
    wr, wc = wr[:, None], wc[None, :]
    rows = x[:, :, r0] * (1 - wr) + x[:, :, r1] * wr  # (B, C, height, w)
    return np.ascontiguousarray(rows[:, :, :, c0] * (1 - wc) + rows[:, :, :, c1] * wc, dtype=np.float32)
