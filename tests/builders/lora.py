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


def build_lycoris(path: Path, folder: Path, kind: Literal["loha", "lokr"], seed: int, rank: int = 2,
                  alpha: float = 1.0, size: float = 1.0):  # fmt: skip
    """A LyCORIS LoHa or LoKr for the UNet of `folder`, made by peft with random factors (times `size`) and saved
    in kohya's names. Returns (path, the UNet with the adapter): peft's own forward is the reference picture."""
    from diffusers import UNet2DConditionModel
    from peft import LoHaConfig, LoKrConfig, inject_adapter_in_model
    from safetensors.numpy import save_file

    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    targets = [n for n, _ in _targets(unet, UNET_LINEAR + UNET_CONV)]
    config = (LoHaConfig if kind == "loha" else LoKrConfig)(r=rank, alpha=alpha, target_modules=targets,
                                                             init_weights=False)  # fmt: skip
    torch.manual_seed(seed)
    unet = inject_adapter_in_model(config, unet)
    tensors: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if ".hada_" in name or ".lokr_" in name:
                param.mul_(size)
                module, _, part = name.removesuffix(".default").rpartition(".")
                key = "lora_unet_" + module.replace(".", "_")
                tensors[f"{key}.{part}"] = param.numpy().copy()
                tensors[f"{key}.alpha"] = np.array(alpha, np.float32)
    if kind == "lokr":  # A1111 reads alpha / rank only when a factor is a product: the fixture must have one
        modules = {k.rpartition(".")[0] for k in tensors}
        assert all(f"{m}.lokr_w1_b" in tensors or f"{m}.lokr_w2_b" in tensors for m in modules)
    save_file(tensors, str(path))
    return Path(path), unet


def build_locon_mid(path: Path, folder: Path, seed: int, rank: int = 4, alpha: float = 2.0, size: float = 0.3):
    """A LoCon for the UNet's 3x3 convolutions in LyCORIS's Tucker form: lora_down (rank, in, 1, 1), lora_mid
    (rank, rank, 3, 3), lora_up (out, rank, 1, 1)."""
    from diffusers import UNet2DConditionModel
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    tensors = {}
    for name, module in _targets(unet, UNET_CONV):
        out, inp, kh, kw = module.weight.shape
        key = "lora_unet_" + name.replace(".", "_")
        tensors |= {
            f"{key}.lora_down.weight": (rng.standard_normal((rank, inp, 1, 1)) * size).astype(np.float32),
            f"{key}.lora_mid.weight": (rng.standard_normal((rank, rank, kh, kw)) * size).astype(np.float32),
            f"{key}.lora_up.weight": (rng.standard_normal((out, rank, 1, 1)) * size).astype(np.float32),
            f"{key}.alpha": np.array(alpha, np.float32),
        }
    save_file(tensors, str(path))
    return Path(path)
