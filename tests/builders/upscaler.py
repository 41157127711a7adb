"""Tiny seeded ESRGAN-family upscaler checkpoints as files, in the layouts people download."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save_file


def _perturbed(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in module.state_dict().items()}


def esrgan_old_state(scale: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """Old ESRGAN layout (`model.0.weight`, `model.1.sub.0.RDB1.conv1.0.weight`, ...), 8 features, 1 block."""
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(seed)
    return _perturbed(ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=scale), seed)


def to_basicsr_layout(old: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename old-layout x4 RRDBNet keys to BasicSR/Real-ESRGAN's (`conv_first`, `body.0.rdb1.conv1`, ...)."""
    blocks = 1 + max(int(m.group(1)) for k in old if (m := re.match(r"model\.1\.sub\.(\d+)\.RDB", k)))
    fixed = {
        "model.0": "conv_first",
        f"model.1.sub.{blocks}": "conv_body",
        "model.3": "conv_up1",
        "model.6": "conv_up2",
        "model.8": "conv_hr",
        "model.10": "conv_last",
    }
    new = {}
    for key, value in old.items():
        if m := re.match(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)", key):
            new[f"body.{m[1]}.rdb{m[2]}.conv{m[3]}.{m[4]}"] = value
        else:
            prefix, leaf = key.rsplit(".", 1)
            new[f"{fixed[prefix]}.{leaf}"] = value
    return new


def build_esrgan_old(path: Path, seed: int = 0) -> Path:
    """x4 ESRGAN, old key layout, saved as a plain-state-dict .pth."""
    torch.save(esrgan_old_state(4, seed), path)
    return path


def build_esrgan_new(path: Path, seed: int = 0) -> Path:
    """x4 RRDBNet in BasicSR's key layout: .safetensors, or .pth wrapped in {"params_ema": ...}."""
    state = to_basicsr_layout(esrgan_old_state(4, seed))
    if Path(path).suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"params_ema": state}, path)
    return path


def build_compact(path: Path, scale: int = 4, seed: int = 0) -> Path:
    """Real-ESRGAN Compact (SRVGGNetCompact), 8 features, 2 convs, as .safetensors."""
    from spandrel.architectures.Compact import Compact

    torch.manual_seed(seed)
    save_file(_perturbed(Compact(num_feat=8, num_conv=2, upscale=scale), seed), str(path))
    return path
