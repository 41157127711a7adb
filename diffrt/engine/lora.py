"""LoRAs merged into a bundle's graphs at run time, in NumPy, always from the base weights.

Files are read with the bounded safetensors reader; pickles (.pt, ...) only when allowed, by diffrt's
tensor-only unpickler. Layouts:
- kohya / A1111: `lora_unet_<module>`, `lora_te_<module>` (SDXL: `lora_te1_`, `lora_te2_`) with `.lora_down.weight`,
  `.lora_up.weight` and `.alpha`; module names are diffusers' with dots as underscores, or for the UNet the
  original (SGM) UNet's (`input_blocks_4_1_...`, as kohya's SDXL trainer writes them);
- diffusers / PEFT: `unet.<module>.lora_A.weight` / `.lora_B.weight` (`text_encoder.`, `text_encoder_2.`), alpha
  from the file's `lora_adapter_metadata`, else the rank; and the older attention-processor layout
  (`...attn1.processor.to_q_lora.down.weight`).
- LyCORIS in kohya's names: LoCon's `lora_mid` (Tucker core of a k x k convolution), LoHa (`hada_w1_a`, ...) and
  LoKr (`lokr_w1`, `lokr_w2_a`, ...); their Tucker variants (`hada_t1`, `lokr_t2`) and DoRA are refused by name.
Linear and Conv2d (1x1 and 3x3) weights: W += scale * alpha / rank * up @ down (LoraModule.delta for the others).
The bundle's weight map (diffrt.export.weight_map) says which graph initializers hold each weight; the merged ones
are handed to the backend as replacements when the component's session is made again."""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffrt.bundle import LORA_COMPONENTS, weight_map
from diffrt.engine.safetensors import load_pickle, read_safetensors, safetensors_metadata
from diffrt.errors import BadInput

MAX_LORA_BYTES = 4 << 30  # SDXL LoRAs of rank 128 are about 900 MB
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}  # fmt: skip
PEFT_PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2"}
PICKLES = (".pt", ".pth", ".bin", ".ckpt")
SUFFIX = ".safetensors"
LORA_TAG = re.compile(r"<lora:([^<>]*)>")  # A1111's extra-network tag in a prompt
log = logging.getLogger(__name__)


KOHYA_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid", "alpha": "alpha",
               **{k: k for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "lokr_w1", "lokr_w1_a",
                                 "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")}}  # fmt: skip
KINDS = {  # the parts each kind of update needs, and those it may have
    "lora": ({"down", "up"}, {"mid"}),  # LoRA / LoCon (mid: LoCon's Tucker core of a k x k convolution)
    "loha": ({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}, set()),  # LyCORIS LoHa (Hadamard product)
    "lokr": (set(), {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"}),  # LoKr (Kronecker)
}


@dataclass(frozen=True)
class LoraModule:
    """One weight's update before the user's scale, by kind: LoRA, up @ down (LoCon's k x k convolutions: up, mid,
    down); LoHa, (w1a @ w1b) * (w2a @ w2b); LoKr, kron(w1, w2) with each factor whole or a product of two; each
    times alpha / rank (LoKr with both factors whole: 1, as A1111 reads them)."""

    component: str
    weight: str  # the weight's name in the bundle's weight map
    kind: str
    parts: dict[str, np.ndarray]
    alpha: float | None  # None: the rank

    def rank(self) -> int | None:
        p = self.parts
        for name in ("down", "hada_w1_b", "lokr_w1_b", "lokr_w2_b"):
            if name in p:
                return p[name].shape[0]
        return None

    def delta(self, shape: tuple[int, ...]) -> np.ndarray:
        p, rank = self.parts, self.rank()
        if self.kind == "lora" and "mid" in p:  # W[o, i, h, w] = sum up[o, a] mid[a, b, h, w] down[b, i]
            up, down = p["up"].reshape(p["up"].shape[0], -1), p["down"].reshape(p["down"].shape[0], -1)
            product = np.einsum("oa,abhw,bi->oihw", up, p["mid"], down)
        elif self.kind == "lora":
            product = p["up"].reshape(p["up"].shape[0], rank) @ p["down"].reshape(rank, -1)
        elif self.kind == "loha":
            product = (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])
        else:
            w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
            w2 = p["lokr_w2"] if "lokr_w2" in p else p["lokr_w2_a"] @ p["lokr_w2_b"]
            if len(shape) == 4:  # a convolution: the second factor carries the kernel
                w2 = w2.reshape(w2.shape[0], -1, *shape[2:])
                w1 = w1.reshape(*w1.shape, 1, 1)
            product = np.kron(w1, w2)
        if product.size != math.prod(shape):
            raise ValueError(f"update of shape {list(product.shape)} for a weight of shape {list(shape)}")
        factor = 1.0 if rank is None else (rank if self.alpha is None else self.alpha) / rank
        product = product.reshape(shape)
        product *= factor
        return product


class WeightMap:
    """A bundle's weight maps: weight name -> initializers, per component and precision, and a lookup from
    kohya's underscored module names."""

    def __init__(self, maps: dict[str, dict]):
        self.maps = maps  # component -> {precision: {weight: [initializers]}, "unused": {weight: shape}}
        self.underscored = {
            (component, w.removesuffix(".weight").replace(".", "_")): w
            for component, m in self.maps.items()
            for w in [*m["fp32"], *m.get("unused", {})]
        }
        unet = [w for (c, w) in self.underscored if c == "unet"]
        resnets = [int(m[1]) for w in unet if (m := re.match(r"down_blocks_0_resnets_(\d+)_", w))]
        self.layers = max(resnets, default=0) + 1  # resnets per down block: how SGM numbers its blocks
        self.attended = {int(m[1]) for w in unet if (m := re.match(r"up_blocks_(\d+)_attentions_", w))}

    @classmethod
    def of_bundle(cls, bundle: Path, components: list[str]) -> WeightMap:
        maps = {}
        for name in components:
            path = Path(bundle) / weight_map(name)
            if not path.is_file():
                raise BadInput(f"{Path(bundle).name} was exported before LoRA support; re-export it to use LoRAs")
            maps[name] = json.loads(path.read_text())
        return cls(maps)

    def sgm(self, module: str) -> str | None:
        """The diffusers name (underscored) of a UNet module in the original (SGM) UNet's words, which kohya's
        SDXL LoRAs use: input_blocks_4_1_... -> down_blocks_1_attentions_0_..., in_layers_2 -> conv1, ..."""
        fixed = {"input_blocks_0_0": "conv_in", "out_2": "conv_out", "time_embed_0": "time_embedding_linear_1",
                 "time_embed_2": "time_embedding_linear_2", "label_emb_0_0": "add_embedding_linear_1",
                 "label_emb_0_2": "add_embedding_linear_2"}  # fmt: skip
        if module in fixed:
            return fixed[module]
        per = self.layers + 1
        if m := re.fullmatch(r"input_blocks_(\d+)_0_op", module):
            return f"down_blocks_{(int(m[1]) - 1) // per}_downsamplers_0_conv"
        if m := re.fullmatch(r"middle_block_([012])_(.+)", module):
            prefix, rest = ("mid_block_resnets_0", "mid_block_attentions_0", "mid_block_resnets_1")[int(m[1])], m[2]
            kind = "attentions" if m[1] == "1" else "resnets"
        elif m := re.fullmatch(r"(input_blocks|output_blocks)_(\d+)_([012])_(.+)", module):
            block, inner, rest = int(m[2]), int(m[3]), m[4]
            if m[1] == "input_blocks":
                i, j = divmod(block - 1, per)
                kind, name = ("resnets", "attentions")[inner] if inner < 2 else "", "down_blocks"
            else:
                i, j = divmod(block, per)
                kinds = ("resnets", "attentions", "upsamplers") if i in self.attended else ("resnets", "upsamplers")
                kind, name = kinds[inner] if inner < len(kinds) else "", "up_blocks"
            if not kind:
                return None
            prefix = f"{name}_{i}_{kind}_{0 if kind == 'upsamplers' else j}"
        else:
            return None
        if kind == "resnets":
            resnet = {"in_layers_2": "conv1", "out_layers_3": "conv2", "emb_layers_1": "time_emb_proj",
                      "skip_connection": "conv_shortcut"}  # fmt: skip
            rest = resnet.get(rest, rest)
        return f"{prefix}_{rest}"

    def weights(self, component: str) -> dict[str, list[dict]]:
        return self.maps[component]["fp32"]

    def shape(self, component: str, weight: str) -> tuple[int, ...] | None:
        """The torch shape of a weight of the model (None: the model has no such weight)."""
        if weight in self.maps[component].get("unused", {}):
            return tuple(self.maps[component]["unused"][weight])
        entries = self.weights(component).get(weight)
        if not entries:
            return None
        shape = tuple(entries[0]["shape"])
        return shape[::-1] if entries[0]["transposed"] else shape

    def targets(self, component: str, precision: str) -> dict[str, list[dict]]:
        m = self.maps[component]
        return m.get(precision, m["fp32"])


def _peft_alpha(metadata: dict[str, str]) -> dict[str, float]:
    """Alpha by component from diffusers' `lora_adapter_metadata` (its LoraConfig per component, flattened as
    "unet.lora_alpha"); per-module alpha_pattern entries are not read."""
    try:
        config = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    except json.JSONDecodeError:
        return {}
    if not isinstance(config, dict):
        return {}
    return {
        key.removesuffix(".lora_alpha"): float(value)
        for key, value in config.items()
        if key.endswith(".lora_alpha") and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


_PEFT_PART = re.compile(r"^(?P<module>.+?)\.(?:lora_(?P<ab>[AB])|(?P<old>lora\.(?:down|up)))\.weight$")
_OLD_PROCESSOR = re.compile(r"\.processor\.(to_[qkv]|to_out)_lora$")


def _split(key: str) -> tuple[str, str, str] | None:
    """(component, module, part) of one key; part is down / up / alpha; None for keys of no known layout."""
    for prefix, component in sorted(KOHYA_PREFIXES.items(), key=lambda p: -len(p[0])):
        if key.startswith(prefix):
            module, _, part = key[len(prefix) :].partition(".")
            part = KOHYA_PARTS.get(part.removesuffix(".weight") if part.startswith(("hada", "lokr")) else part)
            return (component, "kohya:" + module.removeprefix("text_model_"), part) if part else None
    for prefix, component in sorted(PEFT_PREFIXES.items(), key=lambda p: -len(p[0])):
        if key.startswith(prefix):
            rest = key[len(prefix) :]
            if rest.endswith(".alpha"):
                return component, rest.removesuffix(".alpha"), "alpha"
            m = _PEFT_PART.match(rest)
            if m is None:
                return None
            part = "down" if m["ab"] == "A" or (m["old"] or "").endswith("down") else "up"
            module = _OLD_PROCESSOR.sub(lambda p: "." + ("to_out.0" if p[1] == "to_out" else p[1]), m["module"])
            return component, module.removeprefix("text_model."), part
    return None


def read_lora(path: Path, wmap: WeightMap, allow_pickle: bool = False) -> list[LoraModule]:
    """The updates of the LoRA file at `path`, resolved against the bundle's weights; BadInput naming the file
    for a pickle (unless `allow_pickle`: then diffrt's tensor-only unpickler reads it), a corrupt file, keys of no
    known layout or of no weight here, or shapes of another model."""
    path = Path(path)
    pickled = path.suffix.lower() in PICKLES
    if pickled and not allow_pickle:
        raise BadInput(f"{path.name}: a {path.suffix} file is a pickle, which runs code when read; convert it to "
                       ".safetensors, or allow pickles (--allow-pickle)")  # fmt: skip
    if not path.is_file():
        raise BadInput(f"LoRA {path} does not exist")
    if pickled:
        tensors, alphas = load_pickle(path, MAX_LORA_BYTES, "a LoRA"), {}
    else:
        tensors = read_safetensors(path, MAX_LORA_BYTES)
        alphas = _peft_alpha(safetensors_metadata(path, MAX_LORA_BYTES))
    parts: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    unknown = []
    for key, array in tensors.items():
        split = _split(key)
        if split is None or split[0] not in wmap.maps:
            unknown.append(key)
            continue
        parts.setdefault(split[:2], {})[split[2]] = array
    if unknown:
        shown = ", ".join(sorted(unknown)[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
        raise BadInput(f"{path.name}: {len(unknown)} keys of no known LoRA layout or component here: {shown}")
    modules, missing = [], []
    for (component, module), p in sorted(parts.items()):
        if module.startswith("kohya:"):
            name = module.removeprefix("kohya:")
            weight = wmap.underscored.get((component, name))
            if weight is None and component == "unet" and (diffusers_name := wmap.sgm(name)):
                weight = wmap.underscored.get((component, diffusers_name))
        else:
            weight = module + ".weight" if wmap.shape(component, module + ".weight") else None
        if weight is None:
            missing.append(f"{component}:{module.removeprefix('kohya:')}")
            continue
        bad = [k for k, a in p.items() if (a.size != 1 if k == "alpha" else a.ndim < 2 or not a.size)]
        if bad:
            raise BadInput(f"{path.name}: {module.removeprefix('kohya:')}.{bad[0]} has shape {list(p[bad[0]].shape)}, "
                           "which no LoRA has; the file is corrupt")  # fmt: skip
        alpha = float(p.pop("alpha").reshape(-1)[0]) if "alpha" in p else alphas.get(component)
        kind = next((k for k, (needed, optional) in KINDS.items() if set(p) and set(p) <= needed | optional
                     and needed <= set(p)), None)  # fmt: skip
        if kind == "lokr" and not ({"lokr_w1", "lokr_w1_a"} & set(p) and {"lokr_w2", "lokr_w2_a"} & set(p)):
            kind = None
        if kind is None:
            raise BadInput(f"{path.name}: {module.removeprefix('kohya:')} has the parts {', '.join(sorted(p))}, "
                           "which make no known update (LoRA, LoCon, LoHa, LoKr); the file is incomplete")  # fmt: skip
        modules.append(LoraModule(component, weight, kind, p, alpha))
    if missing:
        raise BadInput(f"{path.name} changes weights this bundle does not have ({', '.join(missing[:3])}"
                       f"{' ...' if len(missing) > 3 else ''}): it was made for another model")  # fmt: skip
    for m in modules:
        try:
            m.delta(wmap.shape(m.component, m.weight))
        except ValueError as e:
            raise BadInput(f"{path.name}: {m.weight} of {m.component}: {e}; the LoRA was made for another model") \
                from None  # fmt: skip
    used = [m for m in modules if m.weight in wmap.weights(m.component)]
    if len(used) < len(modules):
        log.debug("%s: %d modules change weights the bundle's graphs never use", path.name, len(modules) - len(used))
    return used


def check_scale(scale: float, name: str) -> float:
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale) or scale < 0:
        raise BadInput(f"LoRA {name}: scale {scale!r} must be a finite number ≥ 0")
    return float(scale)


def merged_weights(
    bundle: Path, wmap: WeightMap, loras: list[tuple[list[LoraModule], float]], precision: str
) -> dict[str, dict[str, np.ndarray]]:
    """component -> {initializer: merged weight} for the LoRA set (each LoRA's modules and scale), every update
    added to the base weights as the bundle holds them (FP32, or FP16 rounded once after the sum)."""
    deltas: dict[tuple[str, str], np.ndarray] = {}
    for modules, scale in loras:  # in place throughout: a UNet's worth of weights is gigabytes
        for m in modules:
            d = m.delta(wmap.shape(m.component, m.weight))
            d *= scale
            key = (m.component, m.weight)
            if key in deltas:
                deltas[key] += d
            else:
                deltas[key] = d
    out: dict[str, dict[str, np.ndarray]] = {c: {} for c in LORA_COMPONENTS if c in wmap.maps}
    files: dict[str, object] = {}
    try:
        for (component, weight), delta in deltas.items():
            targets = wmap.targets(component, precision).get(weight)
            if not targets:
                raise BadInput(f"{Path(bundle).name}: the {precision} {component} graph has no {weight}; re-export it")
            for t in targets:  # read() of the base weights: faster than faulting in a memory map
                if t["file"] not in files:
                    files[t["file"]] = open(Path(bundle) / "onnx" / t["file"], "rb")  # noqa: SIM115
                f = files[t["file"]]
                f.seek(t["offset"])
                base = np.fromfile(f, dtype=t["dtype"], count=math.prod(t["shape"])).reshape(t["shape"])
                merged = base if t["dtype"] == "float32" else base.astype(np.float32)
                merged += delta.T if t["transposed"] else delta
                out[component][t["initializer"]] = merged if t["dtype"] == "float32" else merged.astype(t["dtype"])
    finally:
        for f in files.values():
            f.close()
    return out


def lora_tags(text: str) -> tuple[str, list[tuple[str, float]]]:
    """A1111's `<lora:NAME>` and `<lora:NAME:SCALE>` taken out of a prompt: (the text without them, [(NAME, SCALE)])."""
    found: list[tuple[str, float]] = []

    def take(m: re.Match) -> str:
        name, *scales = (part.strip() for part in m[1].split(":"))
        if not name:
            raise BadInput(f"{m[0]} names no LoRA; write <lora:NAME:SCALE>", "prompt")
        if len(set(scales)) > 1:
            raise BadInput(f"{m[0]}: one scale per LoRA (separate text encoder and UNet scales are not supported)",
                           "prompt")  # fmt: skip
        try:
            scale = float(scales[0]) if scales else 1.0
        except ValueError:
            raise BadInput(f"{m[0]}: the scale must be a number, e.g. <lora:{name}:0.8>", "prompt") from None
        found.append((name, scale))
        return ""

    return LORA_TAG.sub(take, text), found


def lora_names(folder: Path) -> list[str]:
    """The LoRAs of a folder (and its subfolders) by the names requests use: file names without .safetensors."""
    return sorted({p.name.removesuffix(SUFFIX) for p in Path(folder).rglob("*" + SUFFIX) if p.is_file()})


def find_lora(entry: str | Path, folder: Path | None, paths: bool = True) -> Path:
    """The file of one LoRA of a request: a name (with or without .safetensors) of a file in `folder` or its
    subfolders; otherwise, when `paths` allows it, `entry` as a path. A service passes paths=False: a name a
    client sends (a string) is looked up in the folder only, never opened as a path."""
    if "\x00" in str(entry):  # no file has such a name; the OS would not take it
        raise BadInput(f"LoRA name {str(entry)!r} holds a NUL character", "loras")
    inside = folder is not None and Path(entry).resolve().is_relative_to(Path(folder).resolve())
    if isinstance(entry, Path) and (paths or inside):
        return entry  # a path given in Python, or a file found in the folder before
    text = str(entry)
    bare = text and "/" not in text and "\\" not in text and not text.startswith(".")
    if folder is not None and bare:
        stem = text.removesuffix(SUFFIX)
        direct = Path(folder) / (stem + SUFFIX)
        if direct.is_file():
            return direct
        hits = sorted(Path(folder).rglob(glob.escape(stem) + SUFFIX))
        if hits:
            return hits[0]
    if paths and (folder is None or not bare or Path(text).is_file()):
        return Path(text)
    if folder is None:
        raise BadInput(f"LoRA {text!r}: this server was started without --lora-dir, so it has no LoRAs", "loras")
    names = lora_names(folder)
    shown = ", ".join(names[:10]) + (" ..." if len(names) > 10 else "") if names else "none"
    raise BadInput(f"LoRA {text!r} is not in the LoRA folder (available: {shown})", "loras")


def find_loras(
    loras: Sequence[tuple[str | Path, float]], folder: Path | None, paths: bool = True
) -> tuple[tuple[Path, float], ...]:
    return tuple((find_lora(entry, folder, paths), scale) for entry, scale in loras)


def lora_hash(path: Path) -> str:
    """A1111's short hash of a LoRA: of a safetensors file its "addnet" hash (sha256 of the tensor bytes after
    the header), of another the whole file's sha256; 12 hex digits."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if Path(path).suffix == SUFFIX:
            (n,) = struct.unpack("<Q", f.read(8))
            f.seek(8 + n)
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:12]
