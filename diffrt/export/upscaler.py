"""Load an ESRGAN-family upscaler (.safetensors, or .pth through torch's allow-list unpickler) with spandrel.

spandrel reads the hyperparameters (blocks, features, scale) from the weights; diffrt only decides which
architectures it accepts: those that export cleanly to ONNX and TensorRT.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from diffrt.errors import BadInput, UnsupportedModel

log = logging.getLogger(__name__)
SUPPORTED = {"ESRGAN": "ESRGAN / RRDBNet", "Compact": "Real-ESRGAN Compact (SRVGGNet)"}
PICKLE_SUFFIXES = {".pth", ".pt", ".ckpt", ".bin"}
WRAPPERS = ("params_ema", "params", "state_dict", "model", "net_g")


@dataclass(frozen=True)
class LoadedUpscaler:
    module: torch.nn.Module  # (B, 3, H, W) in [0, 1] -> (B, 3, sH, sW), eval mode
    scale: int
    architecture: str  # spandrel's architecture id
    in_channels: int
    out_channels: int
    size_multiple: int  # the input's height and width must be multiples of this


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file, or from a pickle that holds nothing but tensors and containers."""
    if not path.is_file():
        raise BadInput(f"upscaler {path} does not exist; pass a .pth or .safetensors ESRGAN-family file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        elif suffix in PICKLE_SUFFIXES:
            # weights_only=True: torch's allow-list unpickler; objects that would run code are refused.
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        else:
            raise BadInput(f"upscaler {path}: unknown file type {suffix!r}; pass a .safetensors or .pth file")
    except pickle.UnpicklingError as e:
        raise BadInput(
            f"upscaler {path} holds objects other than tensors, refused for safety "
            f"({str(e).splitlines()[0][:100]}); convert it to .safetensors"
        ) from None
    except (RuntimeError, OSError, EOFError, zipfile.BadZipFile, ValueError) as e:
        raise BadInput(
            f"upscaler {path} is corrupt or truncated ({str(e).splitlines()[0][:100]}); re-download it"
        ) from None
    except Exception as e:  # safetensors raises its own error type
        if type(e).__name__ == "SafetensorError":
            raise BadInput(f"upscaler {path} is corrupt or truncated ({e}); re-download it") from None
        raise
    for key in WRAPPERS:  # training checkpoints wrap the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BadInput(f"upscaler {path} does not hold a state dict of tensors; pass ESRGAN-family weights")
    return state


def load_upscaler(path: Path) -> LoadedUpscaler:
    """Recognise the architecture from the weights and return the eval-mode module with its scale."""
    import spandrel

    state = read_state_dict(Path(path))
    try:
        desc = spandrel.ModelLoader().load_from_state_dict(state)
    except spandrel.UnsupportedModelError:
        raise BadInput(
            f"upscaler {path}: spandrel does not recognise these weights; pass an ESRGAN, "
            "Real-ESRGAN or Real-ESRGAN Compact checkpoint"
        ) from None
    except (RuntimeError, KeyError, ValueError) as e:
        raise BadInput(
            f"upscaler {path}: weights look like a known architecture but do not load "
            f"({str(e).splitlines()[0][:100]}); the file is incomplete"
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
    module = desc.model.eval().requires_grad_(False)
    multiple = max(desc.size_requirements.multiple_of, getattr(module, "shuffle_factor", None) or 1)
    log.info("upscaler: %s x%d", desc.architecture.name, desc.scale)
    return LoadedUpscaler(module, desc.scale, arch, desc.input_channels, desc.output_channels, multiple)
