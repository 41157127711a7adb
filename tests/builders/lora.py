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


def sgm_name(name: str, layers: int) -> str:
    """A diffusers UNet module name in the original (SGM) UNet's words, as kohya's SDXL LoRAs name modules."""
    resnet = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
              "conv_shortcut": "skip_connection"}  # fmt: skip
    parts = name.split(".")
    if parts[0] in ("down_blocks", "up_blocks") and parts[2] in ("resnets", "attentions"):
        i, j = int(parts[1]), int(parts[3])
        block = 1 + i * (layers + 1) + j if parts[0] == "down_blocks" else i * (layers + 1) + j
        kind, rest = parts[2], parts[4:]
        sgm = ["input_blocks" if parts[0] == "down_blocks" else "output_blocks", str(block)]
        sgm.append("0" if kind == "resnets" else "1")
    elif parts[0] == "mid_block":
        kind, rest = parts[1], parts[3:]
        sgm = ["middle_block", {("resnets", "0"): "0", ("attentions", "0"): "1", ("resnets", "1"): "2"}[kind, parts[2]]]
    else:
        raise ValueError(f"no SGM name for {name}")
    if kind == "resnets":
        rest = resnet[".".join(rest)].split(".")
    return ".".join(sgm + rest)


def build_lora(
    path: Path,
    folder: Path,
    layout: Literal["kohya", "peft"],
    seed: int,
    rank: int = 4,
    alpha: float = 2.0,
    text_encoder: bool = True,
    size: float = 0.3,
    sgm: bool = False,
) -> Path:
    """A LoRA for the diffusers folder `folder` (UNet, and its text encoders unless told not): kohya keys with an
    alpha per module (SDXL's lora_te1_/lora_te2_; `sgm`: the UNet's modules in the original UNet's names, as
    kohya's SDXL trainer writes them), or PEFT keys (alpha = rank, as diffusers saves them without metadata)."""
    from diffusers import UNet2DConditionModel
    from safetensors.numpy import save_file
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    rng = np.random.default_rng(seed)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    parts = [("unet", _targets(unet, UNET_LINEAR + UNET_CONV))]
    xl = (folder / "text_encoder_2").is_dir()
    if text_encoder:
        parts.append(("text_encoder", _targets(CLIPTextModel.from_pretrained(folder / "text_encoder"), TEXT_LINEAR)))
        if xl:
            encoder_2 = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2")
            parts.append(("text_encoder_2", _targets(encoder_2, TEXT_LINEAR)))
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if xl else "lora_te_", "text_encoder_2": "lora_te2_"}
    tensors = {}
    for component, targets in parts:
        for name, module in targets:
            w = module.weight
            tail = (1, 1) if w.ndim == 4 else ()
            down = (rng.standard_normal((rank, *w.shape[1:])) * size).astype(np.float32)
            up = (rng.standard_normal((w.shape[0], rank, *tail)) * size).astype(np.float32)
            if layout == "kohya":
                if sgm and component == "unet":
                    name = sgm_name(name, unet.config.layers_per_block)
                key = prefixes[component] + name.replace(".", "_")
                tensors |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                            f"{key}.alpha": np.array(alpha, np.float32)}  # fmt: skip
            else:
                tensors |= {f"{component}.{name}.lora_A.weight": down, f"{component}.{name}.lora_B.weight": up}
    save_file(tensors, str(path))
    return Path(path)
