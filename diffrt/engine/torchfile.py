"""Tensors out of a torch-saved file (.pt, .pth, .bin, .ckpt: torch's zip format) without torch and without
running the file's code: the pickle is read by an unpickler that knows only the few names torch writes for
tensors (`torch._utils._rebuild_tensor_v2`, `_rebuild_parameter`, the typed storages, OrderedDict); any other
name (a pickle's way to run code) is refused before anything is called. Storages are read from the zip's
`data/` entries and the tensors rebuilt from size, stride and offset, as NumPy float32 arrays.

Callers still ask the user's permission first (allow_pickle): this is a second fence, not a reason to open every
pickle."""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
import zlib
from pathlib import Path

import numpy as np

from diffrt.errors import BadInput

_STORAGES = {
    "FloatStorage": np.float32, "HalfStorage": np.float16, "DoubleStorage": np.float64, "BFloat16Storage": "bf16",
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16, "CharStorage": np.int8,
    "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}  # fmt: skip


class _Storage:
    def __init__(self, dtype, key: str, numel: int):
        self.dtype, self.key, self.numel = dtype, key, numel


def _rebuild_tensor(storage, offset, size, stride, *_):
    return ("tensor", storage, int(offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, *_):
    return data


_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{("torch", name): name for name in _STORAGES},
}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _GLOBALS:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}, which is not a tensor")
        return _GLOBALS[module, name]

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and pid[1] in _STORAGES):
            raise pickle.UnpicklingError(f"unknown storage reference {str(pid)[:60]}")
        return _Storage(_STORAGES[pid[1]], str(pid[2]), int(pid[4]))


def _array(archive: zipfile.ZipFile, prefix: str, t, cache: dict) -> np.ndarray:
    _, storage, offset, size, stride = t
    if storage.key not in cache:
        raw = archive.read(f"{prefix}data/{storage.key}")
        if storage.dtype == "bf16":  # bfloat16: the high half of a float32
            words = np.frombuffer(raw, dtype="<u2")
            cache[storage.key] = (words.astype(np.uint32) << 16).view(np.float32)
        else:
            cache[storage.key] = np.frombuffer(raw, dtype=np.dtype(storage.dtype).newbyteorder("<"))
    flat = cache[storage.key]
    if any(d < 0 for d in size) or any(s < 0 for s in stride) or len(size) != len(stride) or offset < 0:
        raise ValueError("negative size, stride or offset")
    last = offset + sum((d - 1) * s for d, s in zip(size, stride)) if all(size) else offset - 1
    if last >= flat.size:
        raise ValueError("a tensor past the end of its storage")
    view = np.lib.stride_tricks.as_strided(flat[offset:], size, [s * flat.itemsize for s in stride], writeable=False)
    return np.array(view, dtype=np.float32)


def read_torch_file(path: Path, max_bytes: int) -> object:
    """The file's object with every tensor as a float32 array; BadInput naming the file for anything else."""
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise BadInput(f"{path.name} is {size} bytes, more than the {max_bytes} allowed here")
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":  # torch's zip format; older torch wrote a bare pickle
            raise BadInput(f"{path.name} is not in torch's zip format (an old torch file?); convert it to .safetensors")
    try:
        with zipfile.ZipFile(path) as archive:
            if sum(i.file_size for i in archive.infolist()) > max_bytes:  # a compressed bomb
                raise ValueError(f"more than {max_bytes} bytes once unpacked")
            pkl = [n for n in archive.namelist() if n.endswith("data.pkl")]
            if len(pkl) != 1:
                raise ValueError("no single data.pkl")
            prefix = pkl[0].removesuffix("data.pkl")
            obj = _Unpickler(io.BytesIO(archive.read(pkl[0]))).load()
            cache: dict = {}

            def arrays(o):
                if isinstance(o, tuple) and len(o) == 5 and o[0] == "tensor" and isinstance(o[1], _Storage):
                    return _array(archive, prefix, o, cache)
                if isinstance(o, dict):
                    return {k: arrays(v) for k, v in o.items()}
                if isinstance(o, list | tuple):
                    return type(o)(arrays(v) for v in o)
                return o

            return arrays(obj)
    # a damaged zip also raises NotImplementedError (odd flags, methods, versions), RuntimeError (encrypted
    # entries), zlib.error and OSError: all of them are a bad file here (found by tests/test_fuzz.py)
    except (pickle.UnpicklingError, zipfile.BadZipFile, KeyError, ValueError, TypeError, EOFError, OverflowError,
            AttributeError, IndexError, MemoryError, NotImplementedError, RuntimeError, zlib.error,
            OSError) as e:  # fmt: skip
        why = " ".join(str(e).split())[:120]
        raise BadInput(f"{path.name}: not a readable torch file ({type(e).__name__}: {why})") from None
