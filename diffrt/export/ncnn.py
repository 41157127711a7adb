"""Import Real-ESRGAN's ncnn models (.param graph + .bin weights) as PyTorch state dicts spandrel recognises.

Many upscalers ship only as ncnn files (realesrgan-ncnn-vulkan and its wrappers). The graph is a plain text list of
layers and the .bin holds each layer's weights in layer order, so the learned tensors can be read back and laid out
under the BasicSR key names (RRDBNet, SRVGGNetCompact); spandrel then rebuilds the module and diffrt exports it.
Format: ncnn's docs "param and model file structure" and src/modelbin.cpp (storage tags of the weight blobs).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from diffrt.errors import BadInput

log = logging.getLogger(__name__)
MAGIC = 7767517
# Layers these Real-ESRGAN graphs use; anything else (an InnerProduct, a quantised graph's Requantize) is refused so a
# graph we cannot map never turns into a silently wrong state dict.
SUPPORTED = {"Input", "Convolution", "ReLU", "PReLU", "BinaryOp", "Split", "Concat", "Eltwise", "Interp"}
SUPPORTED |= {"PixelShuffle", "Crop", "Noop"}
TAG_FP16 = 0x01306B47  # ncnn's storage tags (the first 4 bytes of a type-0 blob)
TAG_INT8 = 0x000D4B38
TAG_FP32_SCALED = 0x0002C056  # raw fp32 followed elsewhere by scales; the floats themselves are plain
ParamValue = int | float | list[int | float]


@dataclass
class Layer:
    type: str
    name: str
    inputs: list[str]
    outputs: list[str]
    params: dict[int, ParamValue] = field(default_factory=dict)
    weights: dict[str, np.ndarray] = field(default_factory=dict)  # "weight" (OIHW), "bias", "slope": float32

    def get(self, key: int, default: ParamValue = 0) -> ParamValue:
        return self.params.get(key, default)


def _number(text: str, where: str) -> int | float:
    # ncnn decides int vs float by the spelling: a '.' or an exponent makes it a float.
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise BadInput(f"{where}: {text!r} is not a number; the .param file is corrupt, re-download it") from None


def _parse_params(tokens: list[str], where: str) -> dict[int, ParamValue]:
    params: dict[int, ParamValue] = {}
    for tok in tokens:
        key, sep, value = tok.partition("=")
        if not sep:
            raise BadInput(f"{where}: parameter {tok!r} is not key=value; the .param file is corrupt, re-download it")
        k = int(_number(key, where))
        if k <= -23300:  # array parameter: -23300-id=count,v1,v2,...
            count, *values = value.split(",")
            if int(_number(count, where)) != len(values):
                raise BadInput(f"{where}: array parameter {tok!r} has the wrong length; re-download the .param file")
            params[-k - 23300] = [_number(v, where) for v in values]
        else:
            params[k] = _number(value, where)
    return params


class _Bin:
    """Reads the .bin in layer order the way ncnn's ModelBin does (type 0: tagged blob, type 1: raw float32)."""

    def __init__(self, data: bytes, path: Path):
        self.data, self.pos, self.path = data, 0, path

    def _take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise BadInput(f"{self.path}: ends inside {what}; the .bin does not belong to this .param or is truncated")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def raw(self, count: int, what: str) -> np.ndarray:
        return np.frombuffer(self._take(4 * count, what), dtype="<f4").copy()

    def tagged(self, count: int, what: str) -> np.ndarray:
        tag_bytes = self._take(4, what)
        tag = int.from_bytes(tag_bytes, "little")
        if tag == TAG_FP16:
            size = (2 * count + 3) // 4 * 4  # padded to 4 bytes
            return np.frombuffer(self._take(size, what)[: 2 * count], dtype="<f2").astype(np.float32)
        if tag in (0, TAG_FP32_SCALED):
            return self.raw(count, what)
        kind = "int8" if tag == TAG_INT8 else "codebook-quantised" if sum(tag_bytes) else f"tag {tag:#010x}"
        raise BadInput(
            f"{self.path}: {what} is stored as {kind} weights, which diffrt cannot import; use the fp32 or fp16 model"
        )


def _load_weights(layer: Layer, blob: _Bin) -> None:
    where = f"layer {layer.name} ({layer.type})"
    if layer.type == "Convolution":
        if layer.get(8):
            raise BadInput(f"{where} is an int8-quantised convolution; use the fp32 or fp16 ncnn model")
        out, size = int(layer.get(0)), int(layer.get(6))
        kw = int(layer.get(1))
        kh = int(layer.get(11, kw))
        if out <= 0 or kw <= 0 or size % (out * kh * kw):
            raise BadInput(f"{where}: weight size {size} does not fit {out} outputs of {kh}x{kw}; re-download it")
        weight = blob.tagged(size, f"{where} weights")
        layer.weights["weight"] = weight.reshape(out, size // (out * kh * kw), kh, kw)  # ncnn stores OIHW too
        if layer.get(5):
            layer.weights["bias"] = blob.raw(out, f"{where} bias")
    elif layer.type == "PReLU":
        layer.weights["slope"] = blob.raw(int(layer.get(0)), f"{where} slopes")


def read_ncnn(param_path: Path, bin_path: Path) -> list[Layer]:
    """The layers of an ncnn text .param, in order, each with its weights from the matching .bin."""
    param_path, bin_path = Path(param_path), Path(bin_path)
    for p in (param_path, bin_path):
        if not p.is_file():
            raise BadInput(f"ncnn model file {p} does not exist; pass a .param with its .bin beside it")
    try:
        lines = [ln.split() for ln in param_path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except UnicodeDecodeError:
        raise BadInput(f"{param_path} is not a text .param (a binary .param.bin?); pass the text .param") from None
    if not lines or lines[0] != [str(MAGIC)]:
        raise BadInput(f"{param_path} does not start with ncnn's magic {MAGIC}; pass an ncnn text .param file")
    if len(lines) < 2 or len(lines[1]) != 2:
        raise BadInput(f"{param_path}: second line must be 'layer_count blob_count'; re-download the .param")
    layer_count = int(_number(lines[1][0], str(param_path)))
    if len(lines) - 2 != layer_count:
        raise BadInput(f"{param_path} declares {layer_count} layers but lists {len(lines) - 2}; re-download it")
    blob = _Bin(bin_path.read_bytes(), bin_path)
    layers = []
    for tokens in lines[2:]:
        where = f"{param_path} layer {' '.join(tokens[:2])}"
        if len(tokens) < 4:
            raise BadInput(f"{where}: too few fields; the .param file is corrupt, re-download it")
        kind, name = tokens[0], tokens[1]
        n_in, n_out = int(_number(tokens[2], where)), int(_number(tokens[3], where))
        ios = tokens[4 : 4 + n_in + n_out]
        if len(ios) != n_in + n_out:
            raise BadInput(f"{where}: fewer blob names than its counts say; the .param file is corrupt")
        if kind not in SUPPORTED:
            raise BadInput(f"{where}: ncnn layer type {kind} is not supported; only Real-ESRGAN graphs can be imported")
        layer = Layer(kind, name, ios[:n_in], ios[n_in:], _parse_params(tokens[4 + n_in + n_out :], where))
        _load_weights(layer, blob)
        layers.append(layer)
    if blob.pos != len(blob.data):
        raise BadInput(f"{bin_path} has {len(blob.data) - blob.pos} bytes left over; it does not match {param_path}")
    return layers


def _conv_io(layer: Layer) -> tuple[int, int]:
    w = layer.weights["weight"]
    return w.shape[1], w.shape[0]


def ncnn_scale(layers: list[Layer]) -> tuple[int, float]:
    """(the network's integer upscale, a trailing resize factor or 1.0) read from the PixelShuffle / Interp layers.

    RRDBNet upsamples its features with nearest x2 Interps; Compact ends in a PixelShuffle (its nearest Interp only
    upsamples the skip input, so it does not multiply). Some packages run the x4 network and then shrink its output
    with a bicubic Interp (x2 = x4 then 0.5): that tail is a fixed resize, not weights, and is reported separately.
    """
    shuffle = [int(layer.get(0, 1)) for layer in layers if layer.type == "PixelShuffle"]
    interps = [layer for layer in layers if layer.type == "Interp"]
    if any(int(layer.get(0)) == 1 and (layer.get(3) or layer.get(4)) for layer in interps):
        raise BadInput("ncnn graph resizes to a fixed output size; only scale-factor Interp layers are supported")
    scales = [(float(layer.get(1, 1.0)), float(layer.get(2, 1.0)), int(layer.get(0))) for layer in interps]
    if any(h != w for h, w, _ in scales):
        raise BadInput("ncnn graph scales height and width differently; only square upscalers are supported")
    tail = math.prod(h for h, _, _ in scales if h < 1)
    if shuffle:
        return math.prod(shuffle), tail
    return round(math.prod(h for h, _, mode in scales if h > 1 and mode == 1)), tail


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def _rrdb(convs: list[Layer], scale: int) -> dict[str, torch.Tensor]:
    # conv_first, 15 per block (3 RDBs x 5 convs), conv_body, one conv_up per x2, conv_hr, conv_last.
    n_up = int(math.log2(scale)) if scale > 1 and scale & (scale - 1) == 0 else -1
    blocks, rest = divmod(len(convs) - 4 - n_up, 15)
    if n_up < 0 or rest or blocks < 1:
        raise BadInput(f"ncnn RRDB graph: {len(convs)} convolutions at x{scale} do not form RRDBNet; not importable")
    names = ["conv_first"]
    names += [f"body.{b}.rdb{r}.conv{c}" for b in range(blocks) for r in (1, 2, 3) for c in range(1, 6)]
    names += ["conv_body", *[f"conv_up{i + 1}" for i in range(n_up)], "conv_hr", "conv_last"]
    feat, grow = _conv_io(convs[0])[1], _conv_io(convs[1])[1]
    for name, layer in zip(names, convs):
        c_in, c_out = _conv_io(layer)
        if ".rdb" in name:  # dense block: conv k sees the features plus the k-1 earlier growths
            k = int(name[-1])
            want = (feat + (k - 1) * grow, feat if k == 5 else grow)
        elif name == "conv_first":
            want = (c_in, feat)
        else:
            want = (feat, c_out if name == "conv_last" else feat)
        if (c_in, c_out) != want:
            raise BadInput(f"ncnn RRDB graph: {layer.name} maps {c_in}->{c_out}, RRDBNet's {name} needs {want}")
    state = {}
    for name, layer in zip(names, convs):
        state[f"{name}.weight"] = _tensor(layer.weights["weight"])
        state[f"{name}.bias"] = _tensor(layer.weights["bias"])
    return state


def _compact(layers: list[Layer], scale: int) -> dict[str, torch.Tensor]:
    # SRVGGNetCompact's nn.Sequential `body`: conv, act, conv, act, ..., conv (last: 3*scale^2 channels for shuffle).
    seq = [layer for layer in layers if layer.type in ("Convolution", "PReLU")]
    kinds = [layer.type for layer in seq]
    if len(seq) < 3 or kinds[-1] != "Convolution" or kinds[:-1] != ["Convolution", "PReLU"] * (len(seq) // 2):
        raise BadInput("ncnn Compact graph: convolutions and PReLUs do not alternate; not an SRVGGNetCompact")
    c_out = _conv_io(seq[-1])[1]
    if c_out % (scale * scale):
        raise BadInput(f"ncnn Compact graph: last convolution has {c_out} channels, not a multiple of {scale}^2")
    state = {}
    for i, layer in enumerate(seq):
        if layer.type == "PReLU":
            state[f"body.{i}.weight"] = _tensor(layer.weights["slope"])
        else:
            state[f"body.{i}.weight"] = _tensor(layer.weights["weight"])
            state[f"body.{i}.bias"] = _tensor(layer.weights["bias"])
    return state


def ncnn_to_state_dict(layers: list[Layer]) -> dict[str, torch.Tensor]:
    """BasicSR-layout weights (RRDBNet or SRVGGNetCompact) for a parsed Real-ESRGAN ncnn graph."""
    convs = [layer for layer in layers if layer.type == "Convolution"]
    if not convs or any("bias" not in c.weights or c.weights["weight"].shape[2:] != (3, 3) for c in convs):
        raise BadInput("ncnn graph: expected 3x3 convolutions with bias; not a Real-ESRGAN model")
    scale, tail = ncnn_scale(layers)
    if tail != 1.0:
        msg = "ncnn graph ends in a x%g resize of its x%d network; the imported weights are that x%d network"
        log.warning(msg, tail, scale, scale)
    kinds = {layer.type for layer in layers}
    if "PReLU" in kinds and "PixelShuffle" in kinds:
        return _compact(layers, scale)
    if "Concat" in kinds and "Eltwise" in kinds:
        return _rrdb(convs, scale)
    raise BadInput("ncnn graph is neither RRDBNet nor SRVGGNetCompact; only Real-ESRGAN models can be imported")


def load_ncnn_state_dict(param_path: Path) -> dict[str, torch.Tensor]:
    """State dict from a .param and the .bin of the same name beside it."""
    param_path = Path(param_path)
    return ncnn_to_state_dict(read_ncnn(param_path, param_path.with_suffix(".bin")))


def convert_ncnn(param_path: Path, out_path: Path) -> Path:
    """Write the imported weights as .safetensors (fp32, as ncnn's fp16 blobs widen exactly)."""
    from safetensors.torch import save_file

    out_path = Path(out_path)
    save_file(load_ncnn_state_dict(param_path), str(out_path), metadata={"source": Path(param_path).name})
    return out_path
