"""Images in and out: untrusted image bytes decoded with limits, init images and masks prepared as diffusers
prepares them, and PNGs that carry their generation parameters (A1111's `parameters` text chunk)."""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageOps, PngImagePlugin

from diffrt.engine.hires import UPSCALERS
from diffrt.errors import BadInput

# What callers may pass as an image: a PIL image, an (H, W[, C]) array (uint8, or float in [0, 1]), a path, bytes
ImageLike = Image.Image | np.ndarray | str | os.PathLike | bytes
MAX_IMAGE_PIXELS = 8192 * 8192  # refused from the header, before decoding: a 30000 x 30000 PNG never inflates
MAX_IMAGE_BYTES = 256 * 2**20  # files read from a path
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")  # decoders PIL runs in-process (no EPS/ghostscript)

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


def parameters_text(prompt: str, negative_prompt: str | None, p: dict, index: int = 0) -> str:
    """A1111's layout: prompt, 'Negative prompt: ...', then 'Key: value, ...' on the last line. `index`: which
    image of the call (each has its own seed)."""
    sampler = A1111_NAMES.get(p["scheduler"], p["scheduler"])
    seed = p["all_seeds"][index] if "all_seeds" in p else p["seed"]
    fields = [
        f"Steps: {p['num_inference_steps']}",
        f"Sampler: {sampler}",
        f"CFG scale: {p['guidance_scale']:g}",
        f"Seed: {seed}",
        f"Size: {p['width']}x{p['height']}",
    ]
    if p.get("model_hash"):
        fields.append(f"Model hash: {p['model_hash'][:10]}")
    if p.get("clip_skip", 1) != 1:  # A1111 writes it only when it is not 1
        fields.append(f"Clip skip: {p['clip_skip']}")
    if p.get("strength") is not None:
        fields.append(f"Denoising strength: {p['strength']:g}")
        fields.append(f"Init image hash: {p['init_image_sha256'][:10]}")
    if p.get("hires_scale") is not None:  # A1111's words for its hires fix
        fields.append(f"Hires upscale: {p['hires_scale']:g}")
        if p.get("hires_steps"):
            fields.append(f"Hires steps: {p['hires_steps']}")
        fields.append(f"Hires upscaler: {UPSCALERS[p['hires_upscaler']]}")
        fields.append(f"Denoising strength: {p['hires_strength']:g}")
    if p.get("mask_blur") is not None:
        fields.append(f"Mask blur: {p['mask_blur']}")
    if p.get("loras"):  # A1111's words: the scales are in the prompt's <lora:NAME:SCALE> tags (or the CLI's --lora)
        fields.append('Lora hashes: "' + ", ".join(f"{x['name']}: {x['hash']}" for x in p["loras"]) + '"')
    if p.get("refiner_at") is not None:  # A1111's words for its SDXL refiner
        fields.append(f"Refiner: {(p.get('refiner_hash') or 'refiner')[:10]}")
        fields.append(f"Refiner switch at: {p['refiner_at']:g}")
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


def decode_image(image: ImageLike, field: str) -> tuple[Image.Image | np.ndarray, str]:
    """A picture to work with, and the sha256 of what was given (file bytes, else pixels).

    Returns a PIL image in mode RGB or L, or an (H, W, C) float32 array in [0, 1] (C = 1 or 3) for array input,
    kept exact. Files and bytes: the first frame, EXIF orientation applied (as diffusers' load_image), 16-bit
    grey scaled to 8 bits, other modes converted to RGB (alpha dropped). Every failure is a BadInput naming
    the field."""
    if isinstance(image, Image.Image):
        _check_pixels(image.size, field)
        return _plain(image, field), _sha(image.tobytes())
    if isinstance(image, np.ndarray):
        return _array(image, field)
    if isinstance(image, str | os.PathLike):
        path = Path(image)
        try:
            if path.stat().st_size > MAX_IMAGE_BYTES:
                raise BadInput(f"{field}: {path} is over {MAX_IMAGE_BYTES >> 20} MB; pass a smaller image", field)
            data = path.read_bytes()
        except OSError as e:
            why = e.strerror or e
            raise BadInput(f"{field}: cannot read {path} ({why}); pass an existing image file", field) from None
    elif isinstance(image, bytes | bytearray | memoryview):
        data = bytes(image)
    else:
        raise BadInput(f"{field} must be a PIL image, an array, a path or bytes, got {type(image).__name__}", field)
    return _plain(open_image(data, field), field), _sha(data)


def open_image(data: bytes, field: str) -> Image.Image:
    """The first frame of an image file's bytes, decoded within the pixel limit, EXIF orientation applied, in
    its own mode (alpha kept). BadInput naming the field for anything else."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=FORMATS)
            _check_pixels(im.size, field)
            im.load()
            im = ImageOps.exif_transpose(im)
    except BadInput:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadInput(f"{field}: the image is over {MAX_IMAGE_PIXELS} pixels; pass a smaller image", field) from None
    except Exception as e:  # PIL raises many types for bad files: truncated, unknown format, corrupt chunks
        why = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise BadInput(f"{field}: not a readable image ({why}); pass a PNG, JPEG or WebP file", field) from None
    return im


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_pixels(size: tuple[int, int], field: str) -> None:
    w, h = size
    if w < 1 or h < 1 or w * h > MAX_IMAGE_PIXELS:
        raise BadInput(f"{field}: a {w}x{h} image is outside 1 to {MAX_IMAGE_PIXELS} pixels; pass another", field)


def _plain(im: Image.Image, field: str) -> Image.Image:
    """RGB or L. 16-bit and 32-bit grey are scaled to 8 bits (a plain convert would clip them to white)."""
    if im.mode in ("RGB", "L"):
        return im
    if im.mode.startswith("I"):  # I, I;16, I;16B, ...: 16-bit range
        return Image.fromarray((np.asarray(im, dtype=np.float64) / 257.0).round().clip(0, 255).astype(np.uint8))
    if im.mode == "F":
        return Image.fromarray(np.asarray(im, dtype=np.float64).round().clip(0, 255).astype(np.uint8))
    if im.mode in ("1", "LA", "La"):
        return im.convert("L")
    try:
        return im.convert("RGB")  # P, PA, RGBA, CMYK, YCbCr, LAB, HSV
    except (ValueError, OSError) as e:
        raise BadInput(f"{field}: images of mode {im.mode} are not supported ({e}); pass an RGB image", field) from None


def _array(a: np.ndarray, field: str) -> tuple[np.ndarray, str]:
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise BadInput(f"{field}: an array image must be (H, W), (H, W, 1/3/4), got {a.shape}", field)
    _check_pixels((a.shape[1], a.shape[0]), field)
    sha = _sha(np.ascontiguousarray(a).tobytes())
    if a.dtype == np.uint8:
        out = a.astype(np.float32) / 255.0
    elif np.issubdtype(a.dtype, np.floating):
        out = a.astype(np.float32)
        if not np.isfinite(out).all() or out.min() < 0 or out.max() > 1:
            raise BadInput(f"{field}: a float array image must hold values in [0, 1]", field)
    else:
        raise BadInput(f"{field}: an array image must be uint8 or float in [0, 1], got {a.dtype}", field)
    return np.ascontiguousarray(out[:, :, :3]), sha


def picture_size(picture: Image.Image | np.ndarray) -> tuple[int, int]:
    """(width, height)"""
    return picture.size if isinstance(picture, Image.Image) else (picture.shape[1], picture.shape[0])


def target_size(picture, height: int | None, width: int | None, multiple: int) -> tuple[int, int]:
    """(height, width) of an image-to-image job: the given sides, else the picture's rounded down to `multiple`
    (diffusers' VaeImageProcessor)."""
    w, h = picture_size(picture)
    return (height or h - h % multiple), (width or w - w % multiple)


def _resized(picture, height: int, width: int, mode: str) -> np.ndarray:
    """(H, W, C) float32 in [0, 1] at the size; PIL LANCZOS when the size changes (arrays go through 8 bits)."""
    if isinstance(picture, np.ndarray):
        if picture_size(picture) == (width, height):
            return picture
        u8 = (picture * 255).round().astype(np.uint8)
        picture = Image.fromarray(u8[:, :, 0] if u8.shape[2] == 1 else u8)
    picture = picture.resize((width, height), resample=Image.Resampling.LANCZOS)
    if mode == "RGB":
        picture = picture.convert("RGB")
    elif mode == "L":
        picture = picture.convert("L")
    a = np.asarray(picture, dtype=np.float32) / 255.0
    return a[:, :, None] if a.ndim == 2 else a


def init_image_array(picture, height: int, width: int) -> np.ndarray:
    """The VAE encoder's input (1, 3, H, W) in [-1, 1]: resized (LANCZOS) to the job's size, grey as RGB."""
    a = _resized(picture, height, width, "RGB")
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return np.ascontiguousarray((a * 2.0 - 1.0).transpose(2, 0, 1)[None], dtype=np.float32)


def mask_array(picture, height: int, width: int) -> np.ndarray:
    """The inpainting mask (1, 1, H, W) in {0, 1}, 1 = repaint: resized first, then grey, binarized at 0.5 (as
    diffusers' mask processor does, in that order)."""
    a = _resized(picture, height, width, "L")
    if a.shape[2] == 3:  # an RGB array at the right size: grey as PIL computes it (ITU-R 601-2 luma)
        a = (a @ np.array([0.299, 0.587, 0.114], np.float32))[:, :, None]
    return (a >= 0.5).astype(np.float32).transpose(2, 0, 1)[None]


def blurred(mask: np.ndarray, radius: int) -> np.ndarray:
    """(1, 1, H, W) mask with a Gaussian blur of `radius` pixels (A1111's mask blur), values in [0, 1]."""
    if radius <= 0:
        return mask
    im = Image.fromarray((mask[0, 0] * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(radius))
    return (np.asarray(im, dtype=np.float32) / 255.0)[None, None]
