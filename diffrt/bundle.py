"""The bundle format: a directory that fully describes itself (manifest.json, tokenizer/, onnx/, trt/).

Both halves import this module: export writes a Manifest, the runtime reads one. numpy + stdlib only.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from diffrt.errors import BadInput
from diffrt.specs import ComponentSpec

SCHEMA_VERSION = 2  # 2: component roles in the specs, a VAE encoder, bundle defaults; 1 is read and upgraded
# Schema 1 wrote no roles: the pipeline's roles of the components it had (later bundles carry them in the specs).
_V1_ROLES = {
    "text_encoder": {"cfg_batched": True},
    "text_encoder_2": {"cfg_batched": True},
    "unet": {"cfg_batched": True, "per_step": True},
    "upscaler": {"tiled": True},
}
_V1_STEADY = ("encoder_hidden_states", "text_embeds", "time_ids", "timestep_cond")
# SD 1.x/2.x's training noise schedule as diffusers writes it (PNDM with PLMS steps); releases differ only
# in prediction_type. Used where no checkpoint config exists: single files, benchmarks, test checkpoints.
SD_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "trained_betas": None,
    "prediction_type": "epsilon",
}
# SDXL base's scheduler as diffusers ships it: the same training schedule, Euler with "leading" spacing.
SDXL_SCHEDULER = {
    **{k: v for k, v in SD_SCHEDULER.items() if k != "_class_name"},
    "_class_name": "EulerDiscreteScheduler",
    "interpolation_type": "linear",
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "use_karras_sigmas": False,
}


def sd_model_index(scheduler_class: str) -> dict:
    """model_index.json of a diffusers StableDiffusionPipeline folder without a safety checker, as the folders
    diffrt writes itself (demo training, benchmark and test checkpoints) declare it."""
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", scheduler_class],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }


MANIFEST = "manifest.json"
TOKENIZER = "tokenizer/tokenizer.json"
TOKENIZER_2 = "tokenizer_2/tokenizer.json"  # SDXL's second text encoder's tokenizer
Precision = Literal["fp32", "fp16"]


def token_table(component: str) -> str:
    """Where a text encoder's token embedding table (vocab, D) float32 lies in the bundle, as a .npy file; present
    when the encoder's spec takes `token_embeds`."""
    return f"embeddings/{component}.npy"


LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")  # the graphs LoRAs change


def weight_map(component: str) -> str:
    """Where the bundle says which initializers of a component's graphs hold each Linear / Conv2d weight
    (diffrt.export.weight_map), as JSON; present in bundles exported since LoRA support."""
    return f"weights/{component}.json"


@dataclass(frozen=True)
class ModelInfo:
    family: Literal["sd1", "sd2", "sdxl"]  # label only: behaviour follows the fields below and the specs
    prediction_type: Literal["epsilon", "v_prediction", "sample"]
    latent_channels: int  # the VAE's (an inpainting UNet takes more: see Manifest.inpainting_unet)
    vae_scale_factor: int  # image pixels per latent pixel
    scaling_factor: float  # latents are divided by this before the VAE decoder
    default_size: int  # the checkpoint's native image side in pixels
    # SDXL: an absent negative prompt conditions on zeros, not on the encoded empty string (model_index.json)
    force_zeros_for_empty_prompt: bool = False
    # LCM: guidance is a UNet input (a w-embedding), so text encoders and UNet never see a negative batch
    classifier_free_guidance: bool = True


@dataclass(frozen=True)
class TokenizerInfo:
    max_length: int  # CLIP: 77 including bos and eos
    bos_id: int
    eos_id: int
    pad_id: int  # SD1 pads with eos, SD2 (OpenCLIP) with "!" (id 0)


@dataclass(frozen=True)
class ComponentEntry:
    spec: ComponentSpec
    files: dict[str, str]  # precision -> path relative to the bundle


@dataclass(frozen=True)
class UpscalerInfo:
    architecture: str
    scale: int
    tile: int  # input tile side the runtime uses; also the spec's opt size
    overlap: int  # input pixels shared by neighbouring tiles, blended
    size_multiple: int  # the network's input must be a multiple of this


@dataclass(frozen=True)
class Manifest:
    model: ModelInfo
    tokenizer: TokenizerInfo | None  # the first text encoder's; None where there is none (the SDXL refiner)
    scheduler: dict  # the checkpoint's scheduler config, as diffusers saved it
    components: dict[str, ComponentEntry]
    upscaler: UpscalerInfo | None = None
    tokenizer_2: TokenizerInfo | None = None  # SDXL: the second text encoder's tokenizer (pads with "!")
    source: dict = field(default_factory=dict)  # what it was made from: path, sha256
    tools: dict = field(default_factory=dict)  # versions of the tools that made it
    schema_version: int = SCHEMA_VERSION
    # generation defaults this bundle's model wants (num_inference_steps, guidance_scale, scheduler), over
    # diffrt's own (diffrt.engine.request); the demo's small model sets them
    defaults: dict = field(default_factory=dict)

    @property
    def inpainting_unet(self) -> bool:
        """The UNet takes latents + mask + masked-image latents (SD/SDXL inpainting checkpoints)."""
        sample = self.components["unet"].spec.inputs[0]
        return sample.shape[1] != self.model.latent_channels

    def to_json(self) -> str:
        d = asdict(self)
        for name, entry in self.components.items():
            d["components"][name]["spec"] = entry.spec.to_dict()
        return json.dumps(d, indent=2) + "\n"

    def save(self, bundle: Path) -> None:
        (Path(bundle) / MANIFEST).write_text(self.to_json())

    @classmethod
    def from_dict(cls, d: dict) -> Manifest:
        return cls(
            model=ModelInfo(**d["model"]),
            tokenizer=TokenizerInfo(**d["tokenizer"]) if d.get("tokenizer") else None,
            scheduler=d["scheduler"],
            components={
                k: ComponentEntry(ComponentSpec.from_dict(v["spec"]), dict(v["files"]))
                for k, v in d["components"].items()
            },
            upscaler=UpscalerInfo(**d["upscaler"]) if d.get("upscaler") else None,
            tokenizer_2=TokenizerInfo(**d["tokenizer_2"]) if d.get("tokenizer_2") else None,
            source=d.get("source", {}),
            tools=d.get("tools", {}),
            schema_version=d["schema_version"],
            defaults=dict(d.get("defaults", {})),
        )


def upgrade_v1(d: dict) -> dict:
    """A schema-1 manifest in schema 2's form: its components' roles and steady inputs, as the runtime used
    them then. Such bundles have no VAE encoder: text to image only."""
    d = json.loads(json.dumps(d))  # a deep copy
    for name, entry in d.get("components", {}).items():
        spec = entry.get("spec", {})
        spec.update(_V1_ROLES.get(name, {}))
        for t in spec.get("inputs", ()):
            t["steady"] = t.get("name") in _V1_STEADY
    return d


def load_manifest(bundle: Path | str) -> Manifest:
    """Read and check a bundle's manifest; every failure is a one-line BadInput."""
    bundle = Path(bundle)
    path = bundle / MANIFEST
    if not bundle.is_dir():
        raise BadInput(f"bundle {bundle} does not exist; create one with `diffrt export CHECKPOINT -o {bundle}`")
    if not path.is_file():
        raise BadInput(f"{bundle} is not a diffrt bundle (no {MANIFEST}); create one with `diffrt export`")
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInput(f"{path} is corrupt ({e}); re-export the bundle") from None
    version = d.get("schema_version") if isinstance(d, dict) else None
    if not isinstance(version, int):
        raise BadInput(f"{path} has no schema_version; re-export the bundle")
    if version > SCHEMA_VERSION:
        raise BadInput(
            f"{bundle} uses bundle schema {version}, newer than this diffrt supports ({SCHEMA_VERSION}); upgrade diffrt"
        )
    if version == 1:
        d = upgrade_v1(d)
    try:  # any field of the wrong type or shape, anywhere, is a malformed manifest
        manifest = Manifest.from_dict(d)
        for name, entry in manifest.components.items():
            for precision, rel in entry.files.items():
                if not (bundle / rel).is_file():
                    raise BadInput(f"{bundle}: {name} {precision} graph {rel} is missing; re-export the bundle")
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError) as e:
        why = " ".join(str(e).split())[:120]  # one line, whatever the file held
        raise BadInput(f"{path} is malformed ({type(e).__name__}: {why}); re-export the bundle") from None
    if manifest.tokenizer is None and manifest.tokenizer_2 is None:
        raise BadInput(f"{path} names no tokenizer; re-export the bundle")
    for rel, needed in ((TOKENIZER, manifest.tokenizer is not None), (TOKENIZER_2, manifest.tokenizer_2 is not None)):
        if needed and not (bundle / rel).is_file():
            raise BadInput(f"{bundle}: {rel} is missing; re-export the bundle")
    return manifest


def load_token_table(bundle: Path | str, manifest: Manifest, component: str) -> np.ndarray | None:
    """A text encoder's token embedding table (vocab, D) float32, memory-mapped and checked against its spec;
    None where the encoder's graph looks tokens up itself (bundles exported before textual inversion)."""
    inputs = {t.name: t for t in manifest.components[component].spec.inputs}
    if "token_embeds" not in inputs:
        return None
    path = Path(bundle) / token_table(component)
    want = (inputs["input_ids"].high, inputs["token_embeds"].shape[2])
    try:
        table = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise BadInput(f"{path} is missing or corrupt ({e}); re-export the bundle") from None
    if table.shape != want or table.dtype != np.float32:
        raise BadInput(f"{path} holds {table.dtype} {table.shape}, not float32 {want}; re-export the bundle")
    return table


def token_widths(manifest: Manifest) -> list[int]:
    """The widths of the text encoders that take token embeddings, in order (what an embedding must match)."""
    return [
        t.shape[2]
        for name in ("text_encoder", "text_encoder_2")
        if name in manifest.components
        for t in manifest.components[name].spec.inputs
        if t.name == "token_embeds"
    ]
