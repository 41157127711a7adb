"""Tiny seeded ESRGAN-family upscaler checkpoints as files, in the key layouts people download.

The networks are spandrel's own architecture classes at toy sizes (8 features, 1 RRDB / 2 convs); spandrel's
RRDB fixes the grow channels at 32, so a tiny RRDBNet still has ~0.2M parameters, enough to export in seconds.
Weights get seeded noise on top of the init so outputs are neither trivial nor shared between seeds.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save_file


def _perturbed(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (v + 0.05 * torch.randn(v.shape, generator=g)).contiguous() for k, v in module.state_dict().items()}


def esrgan_old_state(scale: int = 4, seed: int = 0, in_nc: int = 3) -> dict[str, torch.Tensor]:
    """Old ESRGAN layout (`model.0.weight`, `model.1.sub.0.RDB1.conv1.0.weight`, ...), 8 features, 1 block.

    scale is the network's own upsampling (1, 2, 4, 8); in_nc 12 or 48 is Real-ESRGAN's pixel-unshuffled input.
    """
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(seed)
    return _perturbed(ESRGAN(in_nc=in_nc, out_nc=3, num_filters=8, num_blocks=1, scale=scale), seed)


def to_basicsr_layout(old: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename x4 old-layout keys to BasicSR/Real-ESRGAN's (`conv_first`, `body.0.rdb1.conv1`, `conv_up1`, ...)."""
    blocks = 1 + max(int(m[1]) for k in old if (m := re.match(r"model\.1\.sub\.(\d+)\.RDB", k)))
    # Sequential indices of an x4 RRDBNet: conv, trunk, (upsample, conv, act) x2, hr conv, act, last conv.
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


def build_esrgan_old(path: Path, scale: int = 4, seed: int = 0) -> Path:
    """ESRGAN x`scale` in the old key layout, saved with torch.save as a plain-state-dict .pth."""
    torch.save(esrgan_old_state(scale, seed), path)
    return Path(path)


def build_esrgan_new(path: Path, scale: int = 4, seed: int = 0) -> Path:
    """RRDBNet in BasicSR's key layout: `.safetensors`, or `.pth` wrapped in {"params_ema": ...}.

    Like Real-ESRGAN's released x2/x1 models, scale 2 and 1 are an x4 network behind a pixel-unshuffle by 2
    or 4 (12 or 48 input channels); spandrel recognises them from the first conv's input channels.
    """
    factor = {4: 1, 2: 2, 1: 4}[scale]
    state = to_basicsr_layout(esrgan_old_state(4, seed, in_nc=3 * factor * factor))
    if Path(path).suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"params_ema": state}, path)
    return Path(path)


def build_compact(path: Path, scale: int = 4, seed: int = 0) -> Path:
    """Real-ESRGAN Compact (SRVGGNetCompact), 8 features, 2 convs, as `.safetensors`."""
    from spandrel.architectures.Compact import Compact

    torch.manual_seed(seed)
    save_file(_perturbed(Compact(num_feat=8, num_conv=2, upscale=scale), seed), str(path))
    return Path(path)


def onnx_session(module: torch.nn.Module, trace: tuple[int, int] = (32, 32)):
    """An onnxruntime session of `module` exported with dynamic batch/height/width, traced at `trace`."""
    import io

    import onnxruntime as ort

    buf = io.BytesIO()
    torch.onnx.export(
        module,
        (torch.rand(1, 3, *trace),),
        buf,
        dynamo=False,
        opset_version=17,
        input_names=["image"],
        output_names=["upscaled"],
        dynamic_axes={"image": {0: "b", 2: "h", 3: "w"}, "upscaled": {0: "b", 2: "oh", 3: "ow"}},
    )
    return ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
