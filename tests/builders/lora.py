"""Seeded LoRAs for the tiny checkpoints, written in kohya's (A1111's) and diffusers' PEFT layouts."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch

# the Linear targets LoRA trainers use, and one 3x3 convolution per resnet (LoCon)
UNET_LINEAR = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
UNET_CONV = ("conv1",)
TEXT_LINEAR = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1")


def _targets(model: torch.nn.Module, names: tuple[str, ...]) -> list[tuple[str, torch.nn.Module]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and n.endswith(names)]  # fmt: skip


def build_lora(
    path: Path,
    folder: Path,
    layout: Literal["kohya", "peft"],
    seed: int,
    rank: int = 4,
    alpha: float = 2.0,
    text_encoder: bool = True,
    size: float = 0.3,
) -> Path:
    """A LoRA for the diffusers folder `folder` (UNet, and text encoder unless told not): kohya keys with an
    alpha per module, or PEFT keys (alpha = rank, as diffusers saves them without metadata)."""
    from diffusers import UNet2DConditionModel
    from safetensors.numpy import save_file
    from transformers import CLIPTextModel

    rng = np.random.default_rng(seed)
    parts = [("unet", _targets(UNet2DConditionModel.from_pretrained(folder / "unet"), UNET_LINEAR + UNET_CONV))]
    if text_encoder:
        parts.append(("text_encoder", _targets(CLIPTextModel.from_pretrained(folder / "text_encoder"), TEXT_LINEAR)))
    tensors = {}
    for component, targets in parts:
        for name, module in targets:
            w = module.weight
            tail = (1, 1) if w.ndim == 4 else ()
            down = (rng.standard_normal((rank, *w.shape[1:])) * size).astype(np.float32)
            up = (rng.standard_normal((w.shape[0], rank, *tail)) * size).astype(np.float32)
            if layout == "kohya":
                key = {"unet": "lora_unet_", "text_encoder": "lora_te_"}[component] + name.replace(".", "_")
                tensors |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                            f"{key}.alpha": np.array(alpha, np.float32)}  # fmt: skip
            else:
                tensors |= {f"{component}.{name}.lora_A.weight": down, f"{component}.{name}.lora_B.weight": up}
    save_file(tensors, str(path))
    return Path(path)
