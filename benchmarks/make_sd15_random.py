"""Build an SD 1.5-architecture diffusers checkpoint with random weights (860M-parameter UNet).

No real checkpoint can be downloaded here; this one has the real shapes, so export and inference cost what
SD 1.5 costs. The tokenizer is CLIP's real vocabulary (from the open-clip-torch package).

    python benchmarks/make_sd15_random.py build/sd15-random
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def build(folder: Path, seed: int = 0) -> Path:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffrt.bundle import SD_SCHEDULER, sd_model_index
    from diffrt.export.tokenizer import clip_bpe_files

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    clip_bpe_files(folder / "tokenizer", pad="<|endoftext|>")
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=768,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=64,
        cross_attention_dim=768,
        attention_head_dim=8,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        sample_size=512,
    )
    text.save_pretrained(folder / "text_encoder")
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    scheduler = SD_SCHEDULER
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler/scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    (folder / "model_index.json").write_text(json.dumps(sd_model_index("PNDMScheduler"), indent=2))
    print(f"UNet parameters: {sum(p.numel() for p in unet.parameters()) / 1e6:.0f} M")
    return folder


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    build(args.folder, args.seed)
