"""Largest absolute activation per VAE decoder block, against FP16's largest finite value (65504).

Method: forward hooks on every module of `vae.decoder` (and `post_quant_conv`) record max |output| while the
decoder runs in FP32 on latents as a pipeline feeds them (unit-variance noise divided by the VAE's scaling
factor); each top-level block reports the largest value seen inside it, so an overflow in any intermediate
(a conv or attention output, a residual sum) shows, not only the block's output.

    python -m benchmarks.vae_fp16 --vae FOLDER            # a diffusers VAE folder (e.g. a checkpoint's vae/)
    python -m benchmarks.vae_fp16 --sdxl-architecture     # SDXL's VAE config with random weights

Random weights are not the real overflow case: the SDXL VAE's FP16 overflow comes from its trained weights
(a few channels with huge activations), which random initialisation does not reproduce. The numbers show the
method and the headroom of an untrained network only.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

FP16_MAX = 65504.0
SDXL_VAE = {  # AutoencoderKL config of SDXL's VAE
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}


def block_peaks(vae: torch.nn.Module, latents: torch.Tensor) -> dict[str, float]:
    """Max |activation| inside each top-level decoder block, in execution order."""
    d = vae.decoder
    blocks = {"post_quant_conv": vae.post_quant_conv, "decoder.conv_in": d.conv_in, "decoder.mid_block": d.mid_block}
    blocks.update({f"decoder.up_blocks.{i}": m for i, m in enumerate(d.up_blocks)})
    blocks.update({f"decoder.{k}": getattr(d, k) for k in ("conv_norm_out", "conv_act", "conv_out")})
    peaks: dict[str, float] = {}
    hooks = []

    def record(block: str):
        def hook(_module, _inputs, output):
            if isinstance(output, torch.Tensor):
                peaks[block] = max(peaks.get(block, 0.0), float(output.detach().abs().max()))

        return hook

    for block, module in blocks.items():
        for sub in module.modules():
            hooks.append(sub.register_forward_hook(record(block)))
    try:
        with torch.no_grad():
            vae.decode(latents)
    finally:
        for h in hooks:
            h.remove()
    order = list(blocks)
    return {k: peaks[k] for k in sorted(peaks, key=order.index)}


def main(argv: list[str] | None = None) -> None:
    from diffusers import AutoencoderKL

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--vae", type=Path, help="a diffusers AutoencoderKL folder")
    src.add_argument("--sdxl-architecture", action="store_true", help="SDXL's VAE config, random weights")
    p.add_argument("--latent", type=int, default=64, help="latent side (image side / 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    vae = AutoencoderKL.from_config(SDXL_VAE) if args.sdxl_architecture else AutoencoderKL.from_pretrained(args.vae)
    vae = vae.eval().float()
    c = vae.config.latent_channels
    latents = torch.randn(1, c, args.latent, args.latent) / vae.config.scaling_factor
    start = time.perf_counter()
    peaks = block_peaks(vae, latents)
    seconds = time.perf_counter() - start
    print(f"{'block':<26} {'max |activation|':>17} {'/ 65504':>9}")
    for block, peak in peaks.items():
        print(f"{block:<26} {peak:>17.1f} {peak / FP16_MAX:>9.4f}")
    print(f"largest: {max(peaks.values()):.1f} ({max(peaks.values()) / FP16_MAX:.4f} of FP16's range); {seconds:.1f} s")
    if args.json:
        source = "sdxl-architecture-random" if args.sdxl_architecture else str(args.vae)
        record = {"source": source, "latent": args.latent, "seed": args.seed, "peaks": peaks, "seconds": seconds}
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
