"""Load an ESRGAN-family upscaler (.safetensors, or .pth through torch's allow-list unpickler) with spandrel.

spandrel reads the hyperparameters (blocks, features, scale) from the weights; diffrt only decides which
architectures it accepts: those that export cleanly to ONNX and TensorRT with dynamic height and width.
"""

from __future__ import annotations

import logging
import math
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from diffrt.errors import BadInput, UnsupportedModel

log = logging.getLogger(__name__)
SUPPORTED = {"ESRGAN": "ESRGAN / Real-ESRGAN (RRDBNet)", "Compact": "Real-ESRGAN Compact (SRVGGNet)"}
PICKLE_SUFFIXES = {".pth", ".pt", ".ckpt", ".bin"}
WRAPPERS = ("params_ema", "params", "state_dict", "model", "net_g")  # training checkpoints nest the weights


@dataclass(frozen=True)
class LoadedUpscaler:
    module: torch.nn.Module  # (B, 3, H, W) in [0, 1] -> (B, 3, sH, sW), eval mode, no grad
    scale: int
    architecture: str  # spandrel's architecture id: "ESRGAN" or "Compact"
    in_channels: int
    out_channels: int
    size_multiple: int  # the input's height and width must be multiples of this (1: any size)


class Unshuffled(torch.nn.Module):
    """Real-ESRGAN x2 / x1: pixel-unshuffle by `factor` (2 / 4), then spandrel's x4 RRDBNet layers.

    spandrel's forward pads to the multiple behind a Python `if` and crops afterwards. The TorchScript tracer
    keeps only the branch taken at the traced size: traced at a multiple, the graph has no padding and fails on
    other sides. Here the caller pads (the tiler does, by reflection) and the graph has no shape-dependent
    branch; input sides must be multiples of `factor`.
    """

    def __init__(self, body: torch.nn.Module, factor: int):
        super().__init__()
        self.body, self.factor = body, factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(F.pixel_unshuffle(x, self.factor))


def _reason(e: BaseException, limit: int = 120) -> str:
    """The gist of a library error for a one-line message: its first sentence (two lines for torch's
    load_state_dict, whose first line is only a heading)."""
    text = " ".join(s.strip() for s in str(e).splitlines()[:2] if s.strip()) or type(e).__name__
    return text.split(". ")[0][:limit]


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file, or from a pickle that holds nothing but tensors and containers."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"upscaler {path} does not exist; pass a .pth or .safetensors ESRGAN-family file")
    suffix = path.suffix.lower()
    if suffix == ".param":  # an ncnn model: text graph + weights in the .bin of the same name
        from diffrt.export.ncnn import load_ncnn_state_dict

        return load_ncnn_state_dict(path)
    if suffix != ".safetensors" and suffix not in PICKLE_SUFFIXES:
        raise BadInput(f"upscaler {path}: unknown file type {suffix!r}; pass a .safetensors or .pth file")
    if path.stat().st_size == 0:
        raise BadInput(f"upscaler {path} is empty (an interrupted download?); re-download it")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        if suffix == ".safetensors":
            state = load_file(str(path))
        else:
            # weights_only=True: torch's allow-list unpickler; a global outside the list (os.system, a custom
            # class) is refused before anything is called, so nothing in the file can run code.
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = re.search(r"GLOBAL ([\w.]+)", str(e))
        if refused:
            raise BadInput(
                f"upscaler {path} holds a Python object ({refused[1]}) the safe loader refuses; "
                "convert it to .safetensors from a trusted copy"
            ) from None
        raise BadInput(f"upscaler {path} is not a PyTorch checkpoint (corrupt?); re-download it") from None
    except (SafetensorError, RuntimeError, OSError, EOFError, IndexError, zipfile.BadZipFile, ValueError) as e:
        # A legacy (non-zip) pickle cut short surfaces as EOFError or IndexError, a zip one as RuntimeError.
        raise BadInput(f"upscaler {path} is corrupt or truncated ({_reason(e)}); re-download it") from None
    for key in WRAPPERS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BadInput(f"upscaler {path} does not hold a state dict of tensors; pass ESRGAN-family weights")
    return state


def load_upscaler(path: Path) -> LoadedUpscaler:
    """Recognise the architecture from the weights; return the eval-mode, trace-friendly module and its scale."""
    import spandrel

    state = read_state_dict(Path(path))
    try:
        desc = spandrel.ModelLoader().load_from_state_dict(state)
    except spandrel.UnsupportedModelError:
        raise BadInput(
            f"upscaler {path}: spandrel does not recognise these weights; pass an ESRGAN, Real-ESRGAN "
            "or Real-ESRGAN Compact checkpoint"
        ) from None
    except (RuntimeError, KeyError, ValueError, IndexError) as e:  # detected, but keys or shapes do not fit
        raise BadInput(
            f"upscaler {path}: weights look like a known architecture but do not load ({_reason(e)}); "
            "the file is incomplete or modified, re-download it"
        ) from None
    arch = desc.architecture.id
    if arch not in SUPPORTED:
        raise UnsupportedModel(
            f"upscaler {path} is {desc.architecture.name}, not supported; diffrt exports "
            f"{' and '.join(SUPPORTED.values())}"
        )
    if desc.input_channels != 3 or desc.output_channels != 3:
        raise UnsupportedModel(
            f"upscaler {path} maps {desc.input_channels} to {desc.output_channels} channels; "
            "diffrt upscales RGB images (3 -> 3)"
        )
    module: torch.nn.Module = desc.model
    multiple = desc.size_requirements.multiple_of
    factor = getattr(module, "shuffle_factor", None)
    if arch == "ESRGAN" and factor:
        module = Unshuffled(module.model, factor)
        multiple = math.lcm(multiple, factor)  # spandrel asks 4 even for factor 2: keep its stricter rule
    module = module.eval().requires_grad_(False)
    log.info(
        "upscaler %s: %s x%d, sides a multiple of %d", Path(path).name, desc.architecture.name, desc.scale, multiple
    )
    return LoadedUpscaler(module, desc.scale, arch, desc.input_channels, desc.output_channels, multiple)
