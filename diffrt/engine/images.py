"""Image conversion and PNGs that carry their generation parameters (A1111's `parameters` text chunk)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

A1111_NAMES = {  # the names A1111-compatible tools show and parse back
    "ddim": "DDIM",
    "pndm": "PLMS",
    "euler": "Euler",
    "euler_a": "Euler a",
    "heun": "Heun",
    "lms": "LMS",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
    "dpmpp_2m_sde_karras": "DPM++ 2M SDE Karras",
    "unipc": "UniPC",
    "lcm": "LCM",
}


def to_hwc(images: np.ndarray) -> list[np.ndarray]:
    """(B, 3, H, W) float in [0, 1] -> list of (H, W, 3) float32."""
    return [np.ascontiguousarray(im.transpose(1, 2, 0), dtype=np.float32) for im in images]


def to_pil(image_hwc: np.ndarray) -> Image.Image:
    """Round half up to 8 bits, as diffusers' numpy_to_pil does ((x * 255).round())."""
    return Image.fromarray((image_hwc * 255).round().clip(0, 255).astype(np.uint8))


def parameters_text(prompt: str, negative_prompt: str | None, p: dict) -> str:
    """A1111's layout: prompt, 'Negative prompt: ...', then 'Key: value, ...' on the last line."""
    sampler = A1111_NAMES.get(p["scheduler"], p["scheduler"])
    fields = [
        f"Steps: {p['num_inference_steps']}",
        f"Sampler: {sampler}",
        f"CFG scale: {p['guidance_scale']:g}",
        f"Seed: {p['seed']}",
        f"Size: {p['width']}x{p['height']}",
    ]
    if p.get("model_hash"):
        fields.append(f"Model hash: {p['model_hash'][:10]}")
    if p.get("upscaled"):
        fields.append(f"Upscaler: {p['upscaled']}")
    fields.append("Version: diffrt")
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def save_png(image: Image.Image, path: Path, parameters: str) -> None:
    """Write atomically: a temp file in the same folder, renamed into place when complete."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
