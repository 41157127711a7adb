"""Write a diffusers Stable Diffusion (1.x, 2.x, XL) folder as one single-file checkpoint in the original layout.

This is the reverse of diffusers' single-file loading (``diffusers.loaders.single_file_utils``): the UNet goes
under ``model.diffusion_model.``, the VAE under ``first_stage_model.``, SD1's CLIP text encoder under
``cond_stage_model.transformer.text_model.`` and SD2's OpenCLIP text encoder (a CLIP config with
``hidden_act="gelu"``) under ``cond_stage_model.model.``, with q/k/v merged into ``attn.in_proj_*``. SDXL (Stability's
generative-models layout): CLIP ViT-L under ``conditioner.embedders.0.transformer.text_model.``, OpenCLIP bigG
under ``conditioner.embedders.1.model.``, the added text/time embedding as the UNet's ``label_emb``; the SDXL
refiner's bigG, its only text encoder, under ``conditioner.embedders.0.model.``.

The file also carries what real checkpoints carry beyond the weights diffusers reads, so that loaders meet it in
tests: the DDPM schedule buffers (``betas``, ``alphas_cumprod``, ...), SD1's ``embeddings.position_ids``,
OpenCLIP's ``logit_scale`` and ``text_projection`` (stored (width, proj_dim)), and the last OpenCLIP resblock,
which SD2 never runs (it takes the penultimate layer's output, so diffusers' SD2 text encoder has one layer fewer
than the original). Whatever the folder does not hold is seeded noise.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

UNET, VAE = "model.diffusion_model.", "first_stage_model."
CLIP, OPEN_CLIP = "cond_stage_model.transformer.text_model.", "cond_stage_model.model."
XL_CLIP, XL_OPEN_CLIP = "conditioner.embedders.0.transformer.text_model.", "conditioner.embedders.1.model."
XL_REFINER_OPEN_CLIP = "conditioner.embedders.0.model."

_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL's added text/time embedding
    "add_embedding.linear_2": "label_emb.0.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def _load(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A component's config.json and its weights (all *.safetensors shards merged)."""
    config = json.loads((folder / "config.json").read_text())
    weights: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(shard))
    if not weights:
        raise FileNotFoundError(f"no .safetensors weights in {folder}")
    return config, weights


def _module_and_leaf(key: str) -> tuple[str, str]:
    module, _, leaf = key.rpartition(".")
    return module, leaf


def _unet(weights: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel → LDM openaimodel.UNetModel names (no reshaping: both sides agree on
    conv (SD1) or linear (SD2) proj_in/proj_out)."""
    per = config["layers_per_block"] + 1  # input/output blocks per level: resnets (+ the down/upsampler)
    up_attn = {i for i, kind in enumerate(config["up_block_types"]) if "CrossAttn" in kind}
    out = {}
    for key, value in weights.items():
        module, leaf = _module_and_leaf(key)
        block = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)", key)
        mid = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
        if module in _UNET_TOP:
            new = f"{_UNET_TOP[module]}.{leaf}"
        elif block or mid:
            side, level, part, j, rest = block.groups() if block else ("mid", "0", *mid.groups())
            level, j = int(level), int(j)
            if part == "resnets":
                head, _, tail = rest.partition(".")
                rest = f"{_UNET_RESNET[head]}.{tail}"
            if side == "mid":
                new = f"middle_block.{2 * j if part == 'resnets' else 1}.{rest}"
            elif part == "downsamplers":  # rest is conv.{weight,bias}
                new = f"input_blocks.{(level + 1) * per}.0.op.{leaf}"
            elif part == "upsamplers":  # after the level's last resnet (and its attention, if any)
                new = f"output_blocks.{level * per + per - 1}.{2 if level in up_attn else 1}.{rest}"
            else:
                index = 1 + level * per + j if side == "down" else level * per + j
                new = f"{'input' if side == 'down' else 'output'}_blocks.{index}.{int(part == 'attentions')}.{rest}"
        else:
            raise ValueError(f"no LDM name for UNet key {key!r}")
        out[UNET + new] = value
    return out


def _vae(weights: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL → LDM AutoencoderKL names; the decoder's up levels count the other way, and the
    mid attention's projections are 1x1 convs."""
    n_up = len(config["up_block_types"])
    out = {}
    for key, value in weights.items():
        side, _, rest = key.partition(".")
        block = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)", rest)
        mid = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", rest)
        if side not in ("encoder", "decoder"):  # quant_conv, post_quant_conv
            new = key
        elif block:
            kind, level, part, j, leaf = block.groups()
            level = int(level) if kind == "down" else n_up - 1 - int(level)
            if part == "resnets":
                new = f"{side}.{kind}.{level}.block.{j}.{leaf.replace('conv_shortcut', 'nin_shortcut')}"
            else:  # leaf is conv.{weight,bias}
                new = f"{side}.{kind}.{level}.{kind}sample.{leaf}"
        elif mid and mid.group(1) == "resnets":
            new = f"{side}.mid.block_{int(mid.group(2)) + 1}.{mid.group(3)}"
        elif mid:
            module, leaf = _module_and_leaf(mid.group(3))
            new = f"{side}.mid.attn_1.{_VAE_ATTN[module]}.{leaf}"
            value = value[:, :, None, None] if value.ndim == 2 else value
        else:  # conv_in, conv_out, conv_norm_out
            new = f"{side}.{rest.replace('conv_norm_out', 'norm_out')}"
        out[VAE + new] = value
    return out


def _clip(weights: dict[str, torch.Tensor], config: dict, prefix: str = CLIP) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel (SD1, SDXL's first encoder) → the same names under ``prefix``."""
    out = {prefix + key.removeprefix("text_model."): value for key, value in weights.items()}
    out[prefix + "embeddings.position_ids"] = torch.arange(config["max_position_embeddings"])[None]
    return out


def _open_clip(
    weights: dict[str, torch.Tensor], config: dict, gen: torch.Generator, prefix: str = OPEN_CLIP
) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel(WithProjection) standing for OpenCLIP → open_clip's text tower names.

    SD2 (a CLIPTextModel): plus the last resblock that diffusers leaves out and a seeded ``text_projection``.
    SDXL's bigG (with its projection): every resblock is in the folder, ``text_projection`` is its weight
    transposed. Both get ``logit_scale``."""
    w = {key.removeprefix("text_model."): value for key, value in weights.items()}
    projection = w.pop("text_projection.weight", None)
    out = {
        "token_embedding.weight": w.pop("embeddings.token_embedding.weight"),
        "positional_embedding": w.pop("embeddings.position_embedding.weight"),
        "ln_final.weight": w.pop("final_layer_norm.weight"),
        "ln_final.bias": w.pop("final_layer_norm.bias"),
    }
    n = config["num_hidden_layers"]
    for i in range(n):
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{leaf}"] = torch.cat([w.pop(f"{src}self_attn.{q}_proj.{leaf}") for q in "qkv"])
            for module, ldm in _OPEN_CLIP_LAYER.items():
                out[f"{dst}{ldm}.{leaf}"] = w.pop(f"{src}{module}.{leaf}")
    w.pop("embeddings.position_ids", None)
    if w:
        raise ValueError(f"no OpenCLIP name for text encoder keys {sorted(w)}")
    width, dtype = config["hidden_size"], out["ln_final.weight"].dtype
    if projection is not None:
        out["text_projection"] = projection.T.contiguous()  # open_clip applies x @ text_projection
    else:
        for key in [k for k in out if k.startswith("transformer.resblocks.0.")]:  # the last layer, never run by SD2
            value = out[key]
            noise = torch.randn(value.shape, generator=gen, dtype=value.dtype) * 0.02
            is_norm_scale = ".ln_" in key and key.endswith(".weight")
            out[f"transformer.resblocks.{n}." + key.removeprefix("transformer.resblocks.0.")] = noise + is_norm_scale
        out["text_projection"] = torch.randn(width, config["projection_dim"], generator=gen, dtype=dtype) / width**0.5
    out["logit_scale"] = torch.tensor(math.log(100.0), dtype=dtype)  # 0-d, as open_clip stores it
    return {prefix + key: value for key, value in out.items()}


def _ddpm_buffers(scheduler: dict) -> dict[str, torch.Tensor]:
    """The noise-schedule buffers LDM's DDPM registers (and every SD checkpoint carries), float32."""
    start, end = scheduler.get("beta_start", 8.5e-4), scheduler.get("beta_end", 0.012)
    n = scheduler.get("num_train_timesteps", 1000)
    if scheduler.get("beta_schedule", "scaled_linear") == "scaled_linear":  # LDM's "linear" schedule
        betas = torch.linspace(start**0.5, end**0.5, n, dtype=torch.float64) ** 2
    else:
        betas = torch.linspace(start, end, n, dtype=torch.float64)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    posterior_variance = betas * (1.0 - prev) / (1.0 - alphas_cumprod)
    buffers = {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / alphas_cumprod).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1).sqrt(),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * prev.sqrt() / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod),
    }
    return {key: value.float() for key, value in buffers.items()}


def to_single_file(diffusers_folder: Path, out_path: Path, *, seed: int = 0) -> Path:
    """Write the diffusers SD folder ``diffusers_folder`` (unet/, vae/, text_encoder/, scheduler/) as one
    ``.safetensors`` file in the original CompVis / A1111 layout at ``out_path``; returns ``out_path``.
    ``seed`` seeds what the folder does not hold (OpenCLIP's last resblock and text_projection)."""
    folder, out_path = Path(diffusers_folder), Path(out_path)
    gen = torch.Generator().manual_seed(seed)
    state = _unet(*reversed(_load(folder / "unet")))
    state.update(_vae(*reversed(_load(folder / "vae"))))
    if not (folder / "text_encoder").is_dir():  # the SDXL refiner: bigG alone, as the first embedder
        state.update(_open_clip(*reversed(_load(folder / "text_encoder_2")), gen, XL_REFINER_OPEN_CLIP))
    elif (folder / "text_encoder_2").is_dir():  # SDXL: CLIP ViT-L and OpenCLIP bigG under `conditioner.embedders`
        state.update(_clip(*reversed(_load(folder / "text_encoder")), XL_CLIP))
        state.update(_open_clip(*reversed(_load(folder / "text_encoder_2")), gen, XL_OPEN_CLIP))
    else:
        text_config, text_weights = _load(folder / "text_encoder")
        if text_config.get("hidden_act") == "gelu":  # SD2: OpenCLIP ViT-H/14's text tower
            state.update(_open_clip(text_weights, text_config, gen))
        else:
            state.update(_clip(text_weights, text_config))
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    state.update(_ddpm_buffers(json.loads(scheduler_file.read_text()) if scheduler_file.exists() else {}))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: value.contiguous() for key, value in state.items()}, str(out_path), metadata={"format": "pt"})
    return out_path
