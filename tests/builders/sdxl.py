"""Tiny seeded SDXL-family checkpoints (SDXL, SDXL-Turbo) and distilled SD variants (SD-Turbo, LCM) as
diffusers folders.

SDXL: two CLIP text encoders (CLIP-L style, and an OpenCLIP bigG style one with a text projection whose pooled
output conditions the UNet), a UNet with SDXL's added text/time embedding, a VAE configured like SDXL's (scaling
factor 0.13025, force_upcast). What the weights do not show follows SDXL's conventions so that single-file
conversion can infer it: GroupNorm with 32 groups, attention heads of width 64, linear projections, the pooled
projection as wide as bigG's hidden size, 6 micro-conditioning numbers (original size, crop, target size).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch

from diffrt.bundle import SD_SCHEDULER, SDXL_SCHEDULER
from tests.builders.sd import build_sd, write_clip_tokenizer

SDXL_TURBO_SCHEDULER = {
    **SDXL_SCHEDULER,
    "_class_name": "EulerAncestralDiscreteScheduler",
    "timestep_spacing": "trailing",
}
SD_TURBO_SCHEDULER = {**SDXL_SCHEDULER, "timestep_spacing": "trailing"}
LCM_SCHEDULER = {
    **{k: v for k, v in SD_SCHEDULER.items() if k not in ("_class_name", "skip_prk_steps")},
    "_class_name": "LCMScheduler",
    "original_inference_steps": 50,
    "timestep_scaling": 10.0,
    "set_alpha_to_one": True,
    "timestep_spacing": "leading",
}
Variant = Literal["base", "turbo"]


def _perturb(*modules: torch.nn.Module) -> None:
    """Random init leaves near-identity norms; perturb so that every parameter matters to the outputs."""
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.02)


def _text_config(vocab_size: int, hidden: int, layers: int, pad_id: int, act: str):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        max_position_embeddings=77,
        projection_dim=hidden,
        hidden_act=act,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=pad_id,
    )


def _write_json(path: Path, d: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(d, indent=2))


def build_sdxl(folder: Path, seed: int = 0, variant: Variant = "base", *, sample_size: int = 8) -> Path:
    """Save a tiny SDXL (or SDXL-Turbo: trailing-spaced ancestral Euler) checkpoint as a diffusers folder.
    Latent sample_size 8 means 64x64 images."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    write_clip_tokenizer(folder / "tokenizer", "<|endoftext|>")
    write_clip_tokenizer(folder / "tokenizer_2", "!")
    vocab_size = len(json.loads((folder / "tokenizer" / "vocab.json").read_text()))

    text_encoder = CLIPTextModel(_text_config(vocab_size, 64, 3, vocab_size - 1, "quick_gelu")).eval()
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(vocab_size, 128, 3, 0, "gelu")).eval()
    pooled = text_encoder_2.config.projection_dim
    time_embed_dim = 8  # SDXL: 256 per micro-conditioning number
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 128),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=64 + 128,  # both encoders' penultimate states, concatenated
        attention_head_dim=(1, 2),  # number of heads, as SDXL's config means it: heads of width 64
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + pooled,
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
        scaling_factor=0.13025,
        force_upcast=True,
    ).eval()
    _perturb(text_encoder, text_encoder_2, unet, vae)

    text_encoder.save_pretrained(folder / "text_encoder")
    text_encoder_2.save_pretrained(folder / "text_encoder_2")
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    scheduler = SDXL_TURBO_SCHEDULER if variant == "turbo" else SDXL_SCHEDULER
    _write_json(folder / "scheduler" / "scheduler_config.json", scheduler)
    _write_json(
        folder / "model_index.json",
        {
            "_class_name": "StableDiffusionXLPipeline",
            "_diffusers_version": "0.42.1",
            "force_zeros_for_empty_prompt": True,
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "scheduler": ["diffusers", scheduler["_class_name"]],
        },
    )
    return folder


def build_sdxl_refiner(folder: Path, seed: int = 0, *, sample_size: int = 8) -> Path:
    """A tiny refiner in the layout of Stability's SDXL refiner: StableDiffusionXLImg2ImgPipeline with no first
    text encoder (the bigG-style one alone conditions the UNet), 5 micro-conditioning numbers (original size,
    crop, aesthetic score), no attention in the first and last levels, force_zeros_for_empty_prompt off."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    write_clip_tokenizer(folder / "tokenizer_2", "!")
    vocab_size = len(json.loads((folder / "tokenizer_2" / "vocab.json").read_text()))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(vocab_size, 128, 3, 0, "gelu")).eval()
    time_embed_dim = 8
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 128, 128),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=2,  # as the refiner's config: one number, the mid block's depth too
        cross_attention_dim=128,
        attention_head_dim=(1, 2, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=5 * time_embed_dim + text_encoder_2.config.projection_dim,
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
        scaling_factor=0.13025,
        force_upcast=True,
    ).eval()
    _perturb(text_encoder_2, unet, vae)
    text_encoder_2.save_pretrained(folder / "text_encoder_2")
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    _write_json(folder / "scheduler" / "scheduler_config.json", SDXL_SCHEDULER)
    _write_json(
        folder / "model_index.json",
        {
            "_class_name": "StableDiffusionXLImg2ImgPipeline",
            "_diffusers_version": "0.42.1",
            "force_zeros_for_empty_prompt": False,
            "requires_aesthetics_score": True,
            "text_encoder": [None, None],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": [None, None],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        },
    )
    return folder


def build_sd_turbo(folder: Path, seed: int = 0) -> Path:
    """SD-Turbo: the SD 2.x architecture with trailing-spaced Euler, epsilon-predicting, run at 1-4 steps."""
    folder = build_sd(folder, "sd2", seed=seed)
    _write_json(folder / "scheduler" / "scheduler_config.json", SD_TURBO_SCHEDULER)
    index = json.loads((folder / "model_index.json").read_text())
    _write_json(folder / "model_index.json", {**index, "scheduler": ["diffusers", "EulerDiscreteScheduler"]})
    return folder


def build_lcm(folder: Path, seed: int = 0, time_cond_proj_dim: int = 32) -> Path:
    """LCM (LatentConsistencyModelPipeline): an SD1-style UNet with a guidance embedding input, LCMScheduler."""
    from diffusers import UNet2DConditionModel

    folder = build_sd(folder, "sd1", seed=seed)
    config = UNet2DConditionModel.load_config(folder / "unet")
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": time_cond_proj_dim}).eval()
    _perturb(unet)
    unet.save_pretrained(folder / "unet")
    _write_json(folder / "scheduler" / "scheduler_config.json", LCM_SCHEDULER)
    index = json.loads((folder / "model_index.json").read_text())
    _write_json(
        folder / "model_index.json",
        {**index, "_class_name": "LatentConsistencyModelPipeline", "scheduler": ["diffusers", "LCMScheduler"]},
    )
    return folder


if __name__ == "__main__":  # python -m tests.builders.sdxl FOLDER [base|turbo]
    import sys

    print(build_sdxl(Path(sys.argv[1]), variant=sys.argv[2] if len(sys.argv) > 2 else "base"))
