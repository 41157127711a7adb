"""A safetensors reader in NumPy for untrusted files (textual inversion embeddings, LoRAs), with limits.

The format: an 8-byte little-endian header length, that many bytes of JSON naming each tensor's dtype, shape
and byte range in the data that follows (and an optional "__metadata__" of strings). Nothing is executed; every
offset and size is checked before a byte is read as a number.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from diffrt.errors import BadInput

MAX_HEADER = 1 << 25  # bytes of JSON: kohya LoRAs carry ~2000 tensor entries and training metadata
DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


def read_safetensors(path: Path, max_bytes: int) -> dict[str, np.ndarray]:
    """Every tensor of the file as float32 arrays; BadInput naming the file for anything malformed or over
    `max_bytes`."""
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise BadInput(f"{path.name} is {size} bytes, more than the {max_bytes} allowed here")
    data = path.read_bytes()
    if len(data) < 8:
        raise BadInput(f"{path.name} is not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(MAX_HEADER, len(data) - 8):
        raise BadInput(f"{path.name} is not a safetensors file (header length {n})")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInput(f"{path.name}: unreadable safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise BadInput(f"{path.name}: the safetensors header is not an object")
    body = memoryview(data)[8 + n :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = DTYPES[info["dtype"]], tuple(info["shape"]), info["data_offsets"]
            ok = all(isinstance(d, int) and 0 <= d for d in (*shape, begin, end)) and begin <= end <= len(body)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise BadInput(f"{path.name}: tensor {name!r} has a malformed entry {str(info)[:80]!r}")
        count = int(np.prod(shape, dtype=np.int64))
        if count * np.dtype(dtype).itemsize != end - begin:
            raise BadInput(f"{path.name}: tensor {name!r} of shape {list(shape)} does not fill its bytes")
        array = np.frombuffer(body[begin:end], dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
        if info["dtype"] == "BF16":  # the upper half of a float32
            array = (array.astype(np.uint32) << 16).view(np.float32)
        out[name] = array.astype(np.float32)
    return out


def safetensors_metadata(path: Path, max_bytes: int) -> dict[str, str]:
    """The file's "__metadata__" (string to string), {} where it has none or it is not that."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return {}
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER, max_bytes):
            return {}
        try:
            meta = json.loads(f.read(n)).get("__metadata__", {})
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            return {}
    if not isinstance(meta, dict):
        return {}
    return {k: v for k, v in meta.items() if isinstance(k, str) and isinstance(v, str)}


def load_pickle(path: Path, max_bytes: int, what: str) -> dict[str, np.ndarray]:
    """The tensors of a torch-saved file (.pt / .bin / .ckpt) as float32 arrays, read without torch and without
    running its code (diffrt.engine.torchfile). A dict of tensors, or one under "state_dict" (trainers) or
    "string_to_param" (A1111's embeddings, as "emb_params"); BadInput naming `what` the file should have been
    otherwise. Callers ask the user's explicit permission first: a pickle is code."""
    from diffrt.engine.torchfile import read_torch_file

    data = read_torch_file(path, max_bytes)
    if isinstance(data, dict) and isinstance(data.get("string_to_param"), dict) and data["string_to_param"]:
        data = {"emb_params": next(iter(data["string_to_param"].values()))}
    elif isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not data or not all(isinstance(v, np.ndarray) for v in data.values()):
        raise BadInput(f"{Path(path).name}: not {what} (a dict of tensors)")
    return {str(k): v for k, v in data.items()}
