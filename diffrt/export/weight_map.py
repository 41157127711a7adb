"""Where each torch weight a LoRA can change lives in the exported graphs, so the runtime can merge LoRAs without
torch: for every Linear and Conv2d weight of the UNet and text encoders, the initializers holding it (the exporter
renames some and stores Linear weights transposed when it folds a Transpose; the FP16 pass makes new ones), found
by their bytes, and where those bytes are in the graph's external data file.

Graphs that carry such weights are saved with their weights in `<graph>.data` beside them (also below
protobuf's 2 GB): ONNX Runtime then takes replacement weights as external initializers, which it applies before
constant folding (an `add_initializer` override of a folded weight is silently ignored), and the runtime reads
the base weights straight from the file."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import onnx
import torch

log = logging.getLogger(__name__)
_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16"}


def lora_weights(module: torch.nn.Module, wrapped: bool = True) -> dict[str, torch.Tensor]:
    """Linear and Conv2d weights (sharing the parameters' memory) of the model, or of the model an export wrapper
    holds as its first attribute, by their name in the diffusers / transformers model (transformers'
    `text_model.` prefix left out)."""
    out = {}
    for name, sub in module.named_modules():
        if isinstance(sub, (torch.nn.Linear, torch.nn.Conv2d)) and (not wrapped or "." in name):
            key = name.split(".", 1)[1] if wrapped else name
            out[key.removeprefix("text_model.") + ".weight"] = sub.weight.detach()
    return out


def bake_loras(models: dict[str, torch.nn.Module], loras: list[tuple[Path, float]]) -> list[dict]:
    """Merge LoRAs into the models (component name -> diffusers / transformers model) in place, with the
    runtime's reader and arithmetic (diffrt.engine.lora), so a baked bundle draws what switching draws. Returns
    what the manifest records of each: name, A1111's short hash, scale."""
    from diffrt.engine.lora import SUFFIX, WeightMap, check_scale, lora_hash, read_lora

    weights = {name: lora_weights(model, wrapped=False) for name, model in models.items()}
    shapes = {name: {"fp32": {w: [{"shape": list(t.shape), "transposed": False}] for w, t in ws.items()}}
              for name, ws in weights.items()}  # fmt: skip
    wmap = WeightMap(shapes)
    records = []
    for path, scale in loras:
        scale = check_scale(scale, Path(path).name)
        for m in read_lora(Path(path), wmap):
            target = weights[m.component][m.weight]
            base = target.numpy().astype(np.float32)
            target.copy_(torch.from_numpy(base + scale * m.delta(tuple(target.shape))))
        records.append({"name": Path(path).name.removesuffix(SUFFIX), "hash": lora_hash(Path(path)), "scale": scale})
    return records


def externalize(path: Path) -> None:
    """Save the graph at `path` with every initializer of 1 KB or more in `<name>.data` beside it."""
    model = onnx.load(str(path))  # with its external data, if it has some (graphs past 2 GB), in memory
    path.with_name(path.name + ".data").unlink(missing_ok=True)  # onnx appends to a data file that exists
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)  # fmt: skip


def _external_initializers(path: Path) -> dict[bytes, list[dict]]:
    """sha256 of the bytes -> the external initializers of the graph at `path` holding them."""
    model = onnx.load(str(path), load_external_data=False)
    index: dict[bytes, list[dict]] = {}
    for init in model.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL or init.data_type not in _DTYPES:
            continue
        info = {e.key: e.value for e in init.external_data}
        offset, length = int(info.get("offset", 0)), int(info["length"])
        with open(path.parent / info["location"], "rb") as f:
            f.seek(offset)
            digest = hashlib.sha256(f.read(length)).digest()
        entry = {"initializer": init.name, "file": info["location"], "offset": offset, "length": length,
                 "dtype": _DTYPES[init.data_type], "shape": list(init.dims)}  # fmt: skip
        index.setdefault(digest, []).append(entry)
    return index


def graph_weight_map(weights: dict[str, torch.Tensor], path: Path) -> dict[str, list[dict]]:
    """torch weight name -> the initializers of the graph at `path` that hold it (as stored, or transposed).
    Weights whose bytes are also another weight's (which one an initializer holds is unknowable) are left out."""
    index = _external_initializers(path)
    found: dict[str, list[dict]] = {}
    holders: dict[str, set[str]] = {}  # initializer -> the weights whose bytes it has
    for name, tensor in weights.items():
        array = tensor.float().numpy()
        layouts = [(False, array)] + ([(True, array.T)] if array.ndim == 2 else [])
        for transposed, a in layouts:
            for dtype in ("float32", "float16"):
                digest = hashlib.sha256(np.ascontiguousarray(a.astype(dtype)).tobytes()).digest()
                for entry in index.get(digest, []):
                    holders.setdefault(entry["initializer"], set()).add(name)
                    found.setdefault(name, []).append({**entry, "transposed": transposed})
    ambiguous = set().union(*(names for names in holders.values() if len(names) > 1))
    return {name: entries for name, entries in found.items() if name not in ambiguous}


def write_weight_map(module: torch.nn.Module, graphs: dict[str, Path], out: Path) -> int:
    """Write {precision: {weight: [initializers]}, "unused": {weight: shape}} to `out`: "unused" lists the weights
    no graph holds (the export dropped them: SDXL's first text encoder never runs its last layer), which a LoRA
    may name but cannot change. Returns the number of weights found in every graph."""
    weights = lora_weights(module)
    maps = {precision: graph_weight_map(weights, path) for precision, path in graphs.items()}
    unused = {n: list(w.shape) for n, w in weights.items() if not any(n in m for m in maps.values())}
    missing = {n for n in weights if not all(n in m for m in maps.values())} - set(unused)
    if missing:  # in one graph and not another, or the same bytes as another weight: a LoRA on them is refused
        log.info("%s: %d of %d weights not found in every graph (LoRAs cannot change them): %s", out.stem,
                 len(missing), len(weights), ", ".join(sorted(missing)[:5]))  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**maps, "unused": unused}))
    return len(weights) - len(missing) - len(unused)
