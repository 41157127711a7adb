"""Tiny seeded Stable Diffusion checkpoints (SD1-style and SD2-style) saved as diffusers folders.

They use the same classes as real checkpoints (CLIPTextModel, UNet2DConditionModel, AutoencoderKL) at a
size that exports and runs in seconds on a CPU. Every builder is deterministic for a given seed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch

from diffrt.bundle import SD_SCHEDULER, sd_model_index
from diffrt.export.tokenizer import word_bpe_files

Flavour = Literal["sd1", "sd2"]

# A small BPE vocabulary in CLIP's format (byte-level base symbols, one merged token per word).
_WORDS = ["a", "red", "blue", "green", "cute", "narwhal", "circle", "square", "photo", "of", "the", "cat"]


def write_clip_tokenizer(folder: Path, pad: str) -> None:
    """A tiny CLIPTokenizer (pad '<|endoftext|>' or '!')."""
    word_bpe_files(folder, _WORDS, pad)


def _scheduler_config(flavour: Flavour) -> dict:
    if flavour == "sd1":
        return dict(SD_SCHEDULER)
    ddim = {k: v for k, v in SD_SCHEDULER.items() if k != "skip_prk_steps"}
    return {**ddim, "_class_name": "DDIMScheduler", "prediction_type": "v_prediction"}


def build_sd(folder: Path, flavour: Flavour = "sd1", seed: int = 0, *, sample_size: int = 8) -> Path:
    """Save a tiny SD1-style (epsilon, conv projections) or SD2-style (v-prediction, linear projections)
    checkpoint as a diffusers folder. Latent sample_size 8 means 64x64 images.

    What the weights do not show follows real SD's conventions, so single-file conversion can infer it:
    GroupNorm with 32 groups, text encoder heads of width 64, SD1 UNets with 8 heads per attention,
    SD2 UNets with heads of width 64."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    sd2 = flavour == "sd2"
    pad = "!" if sd2 else "<|endoftext|>"
    write_clip_tokenizer(folder / "tokenizer", pad)
    vocab_size = len(json.loads((folder / "tokenizer" / "vocab.json").read_text()))

    text_config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=1,
        max_position_embeddings=77,
        projection_dim=64,
        hidden_act="gelu" if sd2 else "quick_gelu",
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=(vocab_size - 1) if not sd2 else 0,
    )
    text_encoder = CLIPTextModel(text_config).eval()
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 128) if sd2 else (32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=(1, 2) if sd2 else 8,
        use_linear_projection=sd2,
        upcast_attention=sd2,  # as SD 2.x at 768: exercises the FP32 attention islands
        norm_num_groups=32,
    ).eval()
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=sample_size * 8,
    ).eval()
    # Random init leaves near-identity norms; perturb so that every parameter matters to the outputs.
    with torch.no_grad():
        for module in (text_encoder, unet, vae):
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.02)

    text_encoder.save_pretrained(folder / "text_encoder")
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(_scheduler_config(flavour), indent=2))
    index = sd_model_index(_scheduler_config(flavour)["_class_name"])
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def to_inpainting(folder: Path, seed: int = 0) -> Path:
    """Turn a saved SD or SDXL folder into an inpainting checkpoint, as the real ones are made: a UNet of
    2 x 4 + 1 input channels (latents, mask, masked-image latents) and the inpainting pipeline class."""
    from diffusers import UNet2DConditionModel

    folder = Path(folder)
    config = UNet2DConditionModel.load_config(folder / "unet")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config({**config, "in_channels": 9}).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    unet.save_pretrained(folder / "unet")
    index = json.loads((folder / "model_index.json").read_text())
    xl = index["_class_name"].startswith("StableDiffusionXL")
    index["_class_name"] = "StableDiffusionXLInpaintPipeline" if xl else "StableDiffusionInpaintPipeline"
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


if __name__ == "__main__":  # python -m tests.builders.sd FOLDER [sd1|sd2]
    import sys

    print(build_sd(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "sd1"))
