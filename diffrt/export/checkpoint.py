"""Load a Stable Diffusion checkpoint (diffusers folder, hub id, single-file) into torch modules: SD 1.x/2.x,
SDXL, and their few-step distillations (SD-Turbo, SDXL-Turbo: a scheduler config; LCM: a guidance input).

Every failure a user can cause is a one-line BadInput / UnsupportedModel naming the problem and the fix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from diffrt.errors import BadInput, UnsupportedModel

log = logging.getLogger(__name__)

SUPPORTED_PIPELINES = {
    "StableDiffusionPipeline",
    "StableDiffusionXLPipeline",
    "LatentConsistencyModelPipeline",
    "StableDiffusionInpaintPipeline",  # inpainting checkpoints: a UNet of latents + mask + masked latents
    "StableDiffusionXLInpaintPipeline",
    "StableDiffusionXLImg2ImgPipeline",  # an SDXL base saved by the img2img class, or the one-encoder refiner
}
XL_PIPELINES = {"StableDiffusionXLPipeline", "StableDiffusionXLInpaintPipeline", "StableDiffusionXLImg2ImgPipeline"}
SUPPORTED = "SD 1.x, 2.x, XL (and its refiner), Turbo and LCM, and SD / SDXL inpainting"
NOT_YET = {
    "StableDiffusion3Pipeline": "SD3",
    "FluxPipeline": "Flux",
    "StableDiffusionUpscalePipeline": "x4 upscaling",
    "StableDiffusionDepth2ImgPipeline": "depth-to-image",
}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class Checkpoint:
    """The torch modules and configs an SD 1.x/2.x/XL export needs."""

    text_encoder: torch.nn.Module | None  # CLIPTextModel; None: an SDXL refiner, conditioned on the second alone
    unet: torch.nn.Module  # UNet2DConditionModel
    vae: torch.nn.Module  # AutoencoderKL
    tokenizer_dir: Path | None  # folder with vocab.json + merges.txt (+ tokenizer_config.json)
    scheduler_config: dict
    source: dict  # kind, path or id, sha256 of the weights
    text_encoder_2: torch.nn.Module | None = None  # SDXL: CLIPTextModelWithProjection (OpenCLIP bigG)
    tokenizer_2_dir: Path | None = None
    force_zeros_for_empty_prompt: bool = False  # SDXL: zeros, not the empty prompt, as the absent negative

    @property
    def family(self) -> str:
        """'sdxl' with two text encoders; 'sd2' for OpenCLIP-conditioned UNets (linear projections or
        1024-wide text); else 'sd1'."""
        cfg = self.unet.config
        if self.text_encoder_2 is not None:
            return "sdxl"
        return "sd2" if cfg.use_linear_projection or cfg.cross_attention_dim == 1024 else "sd1"


def check_source(source: str) -> None:
    """Fail fast (before any progress output) on a SOURCE that is neither a path nor a hub id."""
    path = Path(source)
    if not path.exists() and not (HUB_ID.match(source) and not source.startswith((".", "/"))):
        raise BadInput(f"{source} does not exist; pass a diffusers folder, a .safetensors file or a hub id")


def load_checkpoint(source: str, *, prediction_type: str | None = None, tokenizer: Path | None = None) -> Checkpoint:
    """Dispatch on the kind of SOURCE: a diffusers folder, a single .safetensors file, or a hub id."""
    path = Path(source)
    if path.is_dir():
        ckpt = load_diffusers_folder(path)
    elif path.is_file():
        if path.suffix.lower() != ".safetensors":
            raise BadInput(
                f"{path}: single-file checkpoints must be .safetensors (pickled .ckpt files are not loaded); "
                "convert it to .safetensors first"
            )
        from diffrt.export.single_file import load_single_file

        ckpt = load_single_file(path, prediction_type=prediction_type, tokenizer=tokenizer)
    elif HUB_ID.match(source) and not source.startswith((".", "/")):
        ckpt = load_diffusers_folder(_download(source))
        ckpt.source = {"kind": "hub", "id": source, **ckpt.source}
    else:
        raise BadInput(f"{source} does not exist; pass a diffusers folder, a .safetensors file or a hub id")
    if prediction_type:
        ckpt.scheduler_config = {**ckpt.scheduler_config, "prediction_type": prediction_type}
    return ckpt


def _download(repo_id: str) -> Path:
    """Fetch the files an SD export needs from the hub; offline, say how to get them instead."""
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}
    hint = f"download it where the hub is reachable (`hf download {repo_id}`) and pass the local folder"
    if offline:
        raise BadInput(f"{repo_id} looks like a hub id but HF_HUB_OFFLINE is set; {hint}")
    from huggingface_hub import snapshot_download

    patterns = ["model_index.json", "*/config.json", "scheduler/*", "tokenizer/*", "*.safetensors"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # network, auth, missing repo: all mean "could not fetch"
        raise BadInput(f"could not fetch {repo_id} from the hub ({type(e).__name__}); {hint}") from None


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInput(f"{path} is malformed ({e}); repair or re-download the checkpoint") from None
    if not isinstance(d, dict):
        raise BadInput(f"{path} is malformed (not a JSON object); repair or re-download the checkpoint")
    return d


def load_diffusers_folder(folder: Path) -> Checkpoint:
    """Load text encoder, UNet, VAE and scheduler config from a diffusers pipeline folder."""
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise BadInput(
            f"{folder} is not a diffusers checkpoint (no model_index.json); pass a diffusers pipeline folder "
            "or a single-file .safetensors"
        )
    index = _read_json(index_path)
    pipeline = index.get("_class_name")
    if pipeline in NOT_YET:
        raise UnsupportedModel(
            f"{folder} is a {NOT_YET[pipeline]} checkpoint ({pipeline}), not supported yet; diffrt exports {SUPPORTED}"
        )
    if pipeline not in SUPPORTED_PIPELINES:
        raise UnsupportedModel(f"{folder}: pipeline class {pipeline!r} is not supported; diffrt exports {SUPPORTED}")
    xl = pipeline in XL_PIPELINES
    # Stability's SDXL refiner: the img2img class with no first text encoder (bigG alone conditions the UNet)
    first = not xl or bool((index.get("text_encoder") or [None])[-1])
    parts = ("unet", "vae", "scheduler")
    parts += ("text_encoder", "tokenizer") if first else ()
    parts += ("text_encoder_2", "tokenizer_2") if xl else ()
    for part in parts:
        if not (folder / part).is_dir():
            raise BadInput(f"{folder} has no {part}/ folder; the checkpoint is incomplete, re-download it")
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet_config = _read_json(folder / "unet" / "config.json")
    latent_channels = int(_read_json(folder / "vae" / "config.json").get("latent_channels", 4))
    check_unet_config(unet_config, folder, xl, latent_channels, inpainting="Inpaint" in pipeline)
    text_encoder = _load(CLIPTextModel, folder / "text_encoder") if first else None
    text_encoder_2 = _load(CLIPTextModelWithProjection, folder / "text_encoder_2") if xl else None
    unet = _load(UNet2DConditionModel, folder / "unet")
    vae = _load(AutoencoderKL, folder / "vae")
    scheduler = _read_json(folder / "scheduler" / "scheduler_config.json")
    weights = sorted(folder.glob("*/*.safetensors")) + sorted(folder.glob("*/*.bin"))
    return Checkpoint(
        text_encoder,
        unet,
        vae,
        folder / "tokenizer" if first else None,
        scheduler,
        {"kind": "diffusers", "path": str(folder), "sha256": hash_files(weights)},
        text_encoder_2=text_encoder_2,
        tokenizer_2_dir=folder / "tokenizer_2" if xl else None,
        # diffusers' SDXL pipeline defaults the flag to True when model_index.json does not set it
        force_zeros_for_empty_prompt=xl and bool(index.get("force_zeros_for_empty_prompt", True)),
    )


def check_unet_config(
    cfg: dict, where: Path | str, xl: bool = False, latent_channels: int = 4, inpainting: bool = True
) -> None:
    """Refuse UNets the export does not handle (yet), or that do not fit the pipeline around them. Inpainting
    UNets take latents + mask + masked-image latents (2 x latent channels + 1), where the pipeline allows them."""
    text_time = cfg.get("addition_embed_type") == "text_time"
    if text_time != xl:
        kind = "an SDXL-style UNet (added text/time conditions)" if text_time else "a UNet without SDXL's conditions"
        raise UnsupportedModel(f"{where}: {kind} does not fit this pipeline; the checkpoint's parts do not match")
    if cfg.get("addition_embed_type") not in (None, "text_time"):
        raise UnsupportedModel(f"{where}: UNet addition_embed_type={cfg['addition_embed_type']!r} is not supported")
    channels = cfg.get("in_channels", 4)
    if channels == 2 * latent_channels + 1 and not inpainting:
        raise UnsupportedModel(
            f"{where}: an inpainting UNet ({channels} input channels) in a text-to-image pipeline folder; "
            "its model_index.json should name StableDiffusion(XL)InpaintPipeline"
        )
    if channels not in (latent_channels, 2 * latent_channels + 1):
        raise UnsupportedModel(
            f"{where}: UNet with {channels} input channels (depth or another conditioning), not supported; "
            f"diffrt exports {latent_channels}-channel and {2 * latent_channels + 1}-channel (inpainting) UNets"
        )


def _load(cls: type, folder: Path) -> torch.nn.Module:
    """from_pretrained in FP32 on CPU, turning library errors into one line with a fix."""
    try:
        model = cls.from_pretrained(folder, torch_dtype=torch.float32)
    except Exception as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise BadInput(
            f"could not load {folder.name} from {folder} ({first}); the weights are corrupt or "
            "incomplete, re-download them"
        ) from None
    return model.eval().requires_grad_(False)


def hash_files(paths: list[Path], chunk: int = 1 << 24) -> str:
    """sha256 over the files' bytes, in order; identifies the weights a bundle came from."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    return h.hexdigest()
