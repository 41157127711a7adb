"""Single-file SD 1.x/2.x/XL checkpoints (original CompVis / A1111 / generative-models key layout) converted offline.

The component configs are read from the weights where the weights show them (channels, blocks, layers,
widths, SDXL's pooled and micro-conditioning widths) and follow SD's conventions where they do not (32 GroupNorm
groups, 8 UNet heads for SD1 and 64-wide heads for SD2/XL, 64-wide text encoder heads). diffusers' own key
converters do the renaming.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from pathlib import Path

import torch

from diffrt.bundle import SD_SCHEDULER, SDXL_SCHEDULER
from diffrt.errors import BadInput
from diffrt.export.checkpoint import Checkpoint, check_unet_config, hash_files

log = logging.getLogger(__name__)

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP_SD1 = "cond_stage_model.transformer.text_model."
CLIP_SD2 = "cond_stage_model.model."
CLIP_XL = "conditioner.embedders.0.transformer.text_model."  # CLIP ViT-L
OPEN_CLIP_XL = "conditioner.embedders.1.model."  # OpenCLIP bigG
OPEN_CLIP_REFINER = "conditioner.embedders.0.model."  # the SDXL refiner's only text encoder: bigG
TEXT = {"sd1": CLIP_SD1, "sd2": CLIP_SD2, "sdxl": CLIP_XL}  # prefix of the (first) text encoder


def _read(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:
        raise BadInput(
            f"{path} is not a readable .safetensors file ({str(e)[:120]}); the file is corrupt or "
            "truncated, re-download it"
        ) from None


def detect_family(sd: dict[str, torch.Tensor], path: Path) -> str:
    """'sd1', 'sd2', 'sdxl' or 'sdxl_refiner' (bigG as the only embedder)."""
    if any(k.startswith("conditioner.embedders.") for k in sd):
        if UNET + "input_blocks.0.0.weight" not in sd or VAE + "decoder.conv_in.weight" not in sd:
            raise BadInput(f"{path} is an incomplete SDXL checkpoint (no UNet/VAE weights); pass a full SDXL file")
        if any(k.startswith(OPEN_CLIP_REFINER) for k in sd):
            return "sdxl_refiner"
        if not any(k.startswith(CLIP_XL) for k in sd) or not any(k.startswith(OPEN_CLIP_XL) for k in sd):
            raise BadInput(f"{path} is an SDXL checkpoint without both text encoders; pass a full SDXL file")
        return "sdxl"
    if UNET + "input_blocks.0.0.weight" not in sd or VAE + "decoder.conv_in.weight" not in sd:
        raise BadInput(
            f"{path} is not a Stable Diffusion checkpoint (no UNet/VAE keys in the original layout); "
            "pass an SD 1.x/2.x single file or a diffusers folder"
        )
    if any(k.startswith(CLIP_SD2 + "transformer.resblocks.") for k in sd):
        return "sd2"
    if any(k.startswith(CLIP_SD1) for k in sd):
        return "sd1"
    raise BadInput(f"{path} has no text encoder weights; pass a full SD checkpoint, not a UNet-only file")


def _count(sd: dict, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd if (m := rx.match(k))})


def unet_config(sd: dict[str, torch.Tensor], family: str, pooled_dim: int = 0, time_ids: int = 6) -> dict:
    """UNet2DConditionModel config from the LDM weights: levels, channels, attention per level; for SDXL the
    transformer depth per level and the added embedding (`label_emb`: `time_ids` numbers, 6 for the base and
    5 for the refiner, + the pooled text)."""
    levels: list[list[int]] = [[]]  # input_blocks indices per level
    n = 1
    while f"{UNET}input_blocks.{n}.0.op.weight" in sd or f"{UNET}input_blocks.{n}.0.in_layers.0.weight" in sd:
        if f"{UNET}input_blocks.{n}.0.op.weight" in sd:
            levels.append([])
        else:
            levels[-1].append(n)
        n += 1
    channels = [int(sd[f"{UNET}input_blocks.{lv[0]}.0.out_layers.3.weight"].shape[0]) for lv in levels]
    attn = [f"{UNET}input_blocks.{lv[0]}.1.proj_in.weight" in sd for lv in levels]
    first_attn = next(lv[0] for lv, a in zip(levels, attn) if a)
    proj_in = sd[f"{UNET}input_blocks.{first_attn}.1.proj_in.weight"]
    cross = int(sd[f"{UNET}input_blocks.{first_attn}.1.transformer_blocks.0.attn2.to_k.weight"].shape[1])
    # diffusers gives the mid block the last level's depth: levels without attention (the refiner's last)
    # carry the mid block's, which they do not use themselves
    mid = _count(sd, rf"{re.escape(UNET)}middle_block\.1\.transformer_blocks\.(\d+)\.") or 1
    depths = [
        _count(sd, rf"{re.escape(UNET)}input_blocks\.{lv[0]}\.1\.transformer_blocks\.(\d+)\.") if a else mid
        for lv, a in zip(levels, attn)
    ]
    xl = family.startswith("sdxl")
    depth = depths if xl else depths[attn.index(True)]
    heads = 8 if family == "sd1" else [max(c // 64, 1) for c in channels]
    cfg = {
        "sample_size": {"sd1": 64, "sd2": 96, "sdxl": 128, "sdxl_refiner": 128}[family],
        "in_channels": int(sd[UNET + "input_blocks.0.0.weight"].shape[1]),
        "out_channels": int(sd[UNET + "out.2.weight"].shape[0]),
        "block_out_channels": channels,
        "layers_per_block": len(levels[0]),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "cross_attention_dim": cross,
        "attention_head_dim": heads,
        "transformer_layers_per_block": depth,
        "use_linear_projection": proj_in.ndim == 2,
        "upcast_attention": family == "sd2",
        "norm_num_groups": 32,
    }
    if xl:
        added = int(sd[UNET + "label_emb.0.0.weight"].shape[1])  # sinusoidal size embeddings + pooled text
        cfg.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=(added - pooled_dim) // time_ids,
            projection_class_embeddings_input_dim=added,
        )
    check_unet_config(cfg, "single-file checkpoint", xl)
    return cfg


def vae_config(sd: dict[str, torch.Tensor], family: str) -> dict:
    levels = _count(sd, rf"{re.escape(VAE)}encoder\.down\.(\d+)\.")
    channels = [int(sd[f"{VAE}encoder.down.{i}.block.0.conv2.weight"].shape[0]) for i in range(levels)]
    return {
        "in_channels": int(sd[VAE + "encoder.conv_in.weight"].shape[1]),
        "out_channels": int(sd[VAE + "decoder.conv_out.weight"].shape[0]),
        "block_out_channels": channels,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "layers_per_block": _count(sd, rf"{re.escape(VAE)}encoder\.down\.0\.block\.(\d+)\."),
        "latent_channels": int(sd[VAE + "post_quant_conv.weight"].shape[0]),
        "norm_num_groups": 32,
        # SDXL's VAE: another latent scale, and FP32 where diffusers would run it in FP16 (it overflows)
        "scaling_factor": 0.13025 if family.startswith("sdxl") else 0.18215,
        "force_upcast": family.startswith("sdxl"),
    }


def text_config(sd: dict[str, torch.Tensor], prefix: str, open_clip: bool, drop_last: bool = False) -> dict:
    """CLIPTextConfig of the text encoder under `prefix`: HF CLIP layout, or OpenCLIP's (`open_clip`)."""
    projection = 0
    if not open_clip:
        emb = sd[prefix + "embeddings.token_embedding.weight"]
        layers = _count(sd, rf"{re.escape(prefix)}encoder\.layers\.(\d+)\.")
        ffn = int(sd[prefix + "encoder.layers.0.mlp.fc1.weight"].shape[0])
        positions = int(sd[prefix + "embeddings.position_embedding.weight"].shape[0])
        act = "quick_gelu"
    else:
        emb = sd[prefix + "token_embedding.weight"]
        # SD 2.x conditions on the penultimate layer: diffusers' text encoder drops OpenCLIP's last block
        # (`drop_last`); SDXL keeps every block and takes the penultimate hidden state at run time.
        layers = _count(sd, rf"{re.escape(prefix)}transformer\.resblocks\.(\d+)\.") - drop_last
        ffn = int(sd[prefix + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0])
        positions = int(sd[prefix + "positional_embedding"].shape[0])
        act = "gelu"
        if not drop_last and prefix + "text_projection" in sd:  # stored (width, projection)
            projection = int(sd[prefix + "text_projection"].shape[1])
    vocab, width = (int(x) for x in emb.shape)
    return {
        "architectures": ["CLIPTextModelWithProjection" if projection else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": vocab,
        "hidden_size": width,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": max(width // 64, 1),
        "max_position_embeddings": positions,
        "hidden_act": act,
        "projection_dim": projection or width,
        "bos_token_id": vocab - 2,
        "eos_token_id": vocab - 1,
        "pad_token_id": 0 if open_clip else vocab - 1,  # OpenCLIP pads with "!"
    }


def _text_encoder(sd: dict[str, torch.Tensor], cfg: dict, prefix: str, open_clip: bool) -> torch.nn.Module:
    """Build the text encoder `cfg` describes and load its weights from under `prefix`."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with_projection = cfg["architectures"] == ["CLIPTextModelWithProjection"]
    model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(CLIPTextConfig(**cfg))
    if open_clip:
        text_sd = convert_open_clip_checkpoint(model, sd, prefix=prefix)
    else:
        text_sd = convert_ldm_clip_checkpoint(sd, remove_prefix=prefix.removesuffix("text_model."))
    projection = text_sd.pop("text_projection.weight", None)
    text_sd = {k.removeprefix("text_model."): v for k, v in text_sd.items() if k.startswith("text_model.")}
    # SD 2.x drops OpenCLIP's last block; diffusers' converter only knows to skip it at index 23.
    last = f"encoder.layers.{cfg['num_hidden_layers']}."
    text_sd = {k: v for k, v in text_sd.items() if not k.startswith(last)}
    # transformers < 5.6 nests the weights under `text_model`; later versions do not.
    target = getattr(model, "text_model", model)
    missing, unexpected = target.load_state_dict(text_sd, strict=False)
    unexpected = [k for k in unexpected if "position_ids" not in k]  # a buffer old checkpoints saved
    if with_projection:
        missing = [k for k in missing if k != "text_projection.weight"]
        if projection is None:
            raise RuntimeError(f"text encoder under {prefix}: no text_projection")
        model.text_projection.load_state_dict({"weight": projection})
    missing = [k for k in missing if "position_ids" not in k]
    if missing or unexpected:
        raise RuntimeError(f"text encoder keys: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval().requires_grad_(False)


def load_single_file(path: Path, prediction_type: str | None = None, tokenizer: Path | None = None) -> Checkpoint:
    """Convert an original-layout SD 1.x/2.x/XL (or SDXL refiner) .safetensors into diffusers modules, offline."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    sd = _read(path)
    family = detect_family(sd, path)
    refiner = family == "sdxl_refiner"  # bigG alone, 5 micro-conditions (an aesthetic score in place of target size)
    xl = family.startswith("sdxl")
    big_g = OPEN_CLIP_REFINER if refiner else OPEN_CLIP_XL
    try:
        t_cfg = None if refiner else text_config(sd, TEXT[family], open_clip=family == "sd2", drop_last=family == "sd2")
        t2_cfg = text_config(sd, big_g, open_clip=True) if xl else None
        u_cfg = unet_config(sd, family, t2_cfg["projection_dim"] if xl else 0, 5 if refiner else 6)
        v_cfg = vae_config(sd, family)
    except (KeyError, StopIteration, IndexError) as e:
        raise BadInput(f"{path}: unexpected layout, missing {e}; the file is incomplete or not SD 1.x/2.x/XL") from None
    default_pred = "v_prediction" if family == "sd2" else "epsilon"
    pred = prediction_type or default_pred
    if not prediction_type:
        log.info(
            "single file: %s checkpoint, assuming prediction_type=%s (override with --prediction-type)", family, pred
        )
    try:
        unet = UNet2DConditionModel.from_config(u_cfg)
        unet.load_state_dict(convert_ldm_unet_checkpoint(sd, unet.config), strict=True)
        vae = AutoencoderKL.from_config(v_cfg)
        vae.load_state_dict(convert_ldm_vae_checkpoint(sd, vae.config), strict=True)
        text_encoder = None if refiner else _text_encoder(sd, t_cfg, TEXT[family], open_clip=family == "sd2")
        text_encoder_2 = _text_encoder(sd, t2_cfg, big_g, open_clip=True) if xl else None
    except RuntimeError as e:
        raise BadInput(
            f"{path}: weights do not fit the inferred {family} architecture "
            f"({str(e).splitlines()[0][:160]}); pass a standard SD 1.x/2.x/XL checkpoint"
        ) from None
    tok_dir = None
    if not refiner:
        pad = "!" if family == "sd2" else "<|endoftext|>"
        tok_dir = tokenizer or _default_tokenizer(t_cfg["vocab_size"], path, pad)
    tok_2_dir = None
    if xl:  # the same BPE, padded with "!" as OpenCLIP pads
        tok_2_dir = _repadded(tokenizer, "!") if tokenizer else _default_tokenizer(t2_cfg["vocab_size"], path, "!")
    scheduler = {**(SDXL_SCHEDULER if xl else SD_SCHEDULER), "prediction_type": pred}
    return Checkpoint(
        text_encoder,
        unet.eval().requires_grad_(False),
        vae.eval().requires_grad_(False),
        tok_dir,
        scheduler,
        {"kind": "single_file", "path": str(path), "sha256": hash_files([path])},
        text_encoder_2=text_encoder_2,
        tokenizer_2_dir=tok_2_dir,
        force_zeros_for_empty_prompt=family == "sdxl",  # SDXL base's own setting; the refiner's is off
    )


def _default_tokenizer(vocab_size: int, path: Path, pad: str) -> Path:
    """CLIP's BPE tokenizer, built from the vocabulary the open-clip-torch package ships."""
    from diffrt.export.tokenizer import clip_bpe_files

    if vocab_size != 49408:
        raise BadInput(
            f"{path}: text encoder vocabulary of {vocab_size} is not CLIP's (49408); pass the matching "
            "tokenizer folder with --tokenizer"
        )
    folder = Path(tempfile.mkdtemp(prefix="diffrt-tokenizer-"))
    clip_bpe_files(folder, pad=pad)
    (folder / "source.json").write_text(json.dumps({"from": "open_clip bpe_simple_vocab_16e6"}))
    return folder


def _repadded(tokenizer: Path, pad: str) -> Path:
    """A copy of a CLIP tokenizer folder with another pad token (SDXL's second tokenizer pads with "!")."""
    folder = Path(tempfile.mkdtemp(prefix="diffrt-tokenizer-"))
    shutil.copytree(tokenizer, folder, dirs_exist_ok=True)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        config = folder / name
        if config.is_file():
            config.write_text(json.dumps({**json.loads(config.read_text()), "pad_token": pad}))
    return folder
