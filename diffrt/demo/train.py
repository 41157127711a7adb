"""Train the demo text-to-image model from scratch on the scene world (diffrt/demo/scenes.py), on a CPU.

The same classes as a real SD 1.x checkpoint (CLIPTextModel, UNet2DConditionModel with cross-attention,
AutoencoderKL with scale factor 8), small enough to train in under two hours on two cores, saved as an ordinary
diffusers folder (FP16 weights, to stay small). Two phases: the VAE alone, then the UNet and the text encoder
together on latents of a fixed scene set. Every phase checkpoints its state into --work and resumes from it,
so an interrupted run continues where it stopped and ends with the same weights.

    python -m diffrt.demo.train --work build/demo-train --out diffrt/demo/checkpoint
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffrt.bundle import SD_SCHEDULER, sd_model_index
from diffrt.demo import scenes
from diffrt.export.tokenizer import word_bpe_files

log = logging.getLogger("diffrt.demo.train")
MAX_TOKENS = 24  # captions are at most 13 tokens; a shorter context than CLIP's 77 makes training 1.6x faster


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    vae_steps: int = 2500
    vae_batch: int = 32
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6  # a near-deterministic autoencoder, as SD's (the scaling factor fixes the variance)
    scenes: int = 60000  # the fixed training set the UNet sees (its latents are computed once)
    unet_steps: int = 5000
    unet_batch: int = 128
    unet_lr: float = 5e-4
    warmup: int = 500
    # v-prediction asks for the clean picture at high noise, where the layout is decided; with epsilon the
    # object's position barely enters the loss there, and an epsilon run of this model drew it at chance.
    prediction_type: str = "v_prediction"
    uncond_prob: float = 0.1  # captions dropped to "" so classifier-free guidance works
    ema_decay: float = 0.999
    save_every_s: float = 180.0  # resume granularity


def build_models(vocab_size: int):
    """The three networks, at the demo's size."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=MAX_TOKENS,
            projection_dim=128,
            hidden_act="quick_gelu",
            bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1,
            pad_token_id=vocab_size - 1,
        )
    )
    # Three levels (8x8 -> 4x4 -> 2x2 latents): the bottleneck sees the whole picture, which is what lets the
    # UNet place an object on a named side (zero padding is the only hint of position a convolution gets).
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 128, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=128,
        attention_head_dim=4,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=scenes.SIZE,
    )
    return text_encoder, unet, vae


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, 64, 64) in [-1, 1]


def _lr(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


class Phase:
    """Checkpointed training state of one phase: modules + optimizer + step, saved atomically.

    `budget` is a shared one-element list: optimiser steps this run may still take (None: no limit)."""

    def __init__(self, path: Path, every_s: float, budget: list):
        self.path, self.every_s, self.last, self.budget = path, every_s, time.monotonic(), budget

    def spend(self) -> bool:
        """Count one step; False once this run's step budget is used up."""
        if self.budget[0] is None:
            return True
        self.budget[0] -= 1
        return self.budget[0] >= 0

    def load(self, objects: dict) -> int:
        if not self.path.exists():
            return 0
        state = torch.load(self.path, weights_only=True)
        for name, obj in objects.items():
            obj.load_state_dict(state[name])
        log.info("resumed %s at step %d", self.path.name, state["step"])
        return int(state["step"])

    def maybe_save(self, objects: dict, step: int, *, force: bool = False) -> None:
        if not force and time.monotonic() - self.last < self.every_s:
            return
        tmp = self.path.with_suffix(".tmp")
        torch.save({"step": step, **{k: v.state_dict() for k, v in objects.items()}}, tmp)
        tmp.replace(self.path)
        self.last = time.monotonic()


def train_vae(vae, cfg: TrainConfig, work: Path, budget: list) -> bool:
    """Train the autoencoder; False if this run's step budget ended the phase early (state saved)."""
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.vae_lr)
    phase = Phase(work / "vae.pt", cfg.save_every_s, budget)
    objects = {"vae": vae, "opt": opt}
    start = phase.load(objects)
    vae.train()
    t0, losses = time.monotonic(), []
    for step in range(start, cfg.vae_steps):
        if not phase.spend():
            phase.maybe_save(objects, step, force=True)
            return False
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg.vae_steps, cfg.vae_lr, 100)
        _, images = scenes.batch(cfg.seed * 1_000_003 + step, cfg.vae_batch)
        x = _to_tensor(images)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(recon, x) + cfg.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(F.mse_loss(recon, x).item())
        if (step + 1) % 100 == 0:
            mse = np.mean(losses[-100:]) / 4  # [-1, 1] -> [0, 1] scale
            log.info(
                "vae %d/%d  psnr %.1f dB  %.2f s/step",
                step + 1,
                cfg.vae_steps,
                -10 * np.log10(mse),
                (time.monotonic() - t0) / len(losses),
            )
        phase.maybe_save(objects, step + 1)
    phase.maybe_save(objects, cfg.vae_steps, force=True)
    vae.eval()
    return True


@torch.no_grad()
def encode_scenes(vae, cfg: TrainConfig, work: Path):
    """Latents (posterior means, scaled to unit variance) of the fixed training scenes, cached in --work."""
    path = work / "latents.pt"
    if path.exists():
        data = torch.load(path, weights_only=False)
        vae.register_to_config(scaling_factor=data["scaling_factor"])
        return data["latents"], data["scenes"]
    rng = np.random.default_rng(cfg.seed + 7)
    all_scenes = [scenes.random_scene(rng) for _ in range(cfg.scenes)]
    latents = []
    for i in range(0, cfg.scenes, 500):
        images = np.stack([scenes.draw(s, rng) for s in all_scenes[i : i + 500]])
        latents.append(vae.encode(_to_tensor(images)).latent_dist.mean)
    latents = torch.cat(latents)  # (N, 4, 8, 8)
    scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    log.info("encoded %d scenes; scaling factor %.4f", len(latents), scaling)
    data = {"latents": latents * scaling, "scenes": [asdict(s) for s in all_scenes], "scaling_factor": scaling}
    torch.save(data, path)
    return data["latents"], data["scenes"]


def train_unet(text_encoder, unet, tokenizer, latents, scene_dicts, cfg: TrainConfig, work: Path, budget: list):
    """Train UNet + text encoder on the latents; their EMA weights, or None if the step budget ran out first."""
    from diffusers import DDPMScheduler

    noise_schedule = DDPMScheduler.from_config({k: v for k, v in _scheduler_config(cfg).items() if k != "_class_name"})
    ema = torch.optim.swa_utils.AveragedModel(
        torch.nn.ModuleDict({"unet": unet, "text_encoder": text_encoder}),
        multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema_decay),
    )
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.01)
    phase = Phase(work / "unet.pt", cfg.save_every_s, budget)
    objects = {"unet": unet, "text_encoder": text_encoder, "ema": ema, "opt": opt}
    start = phase.load(objects)
    all_scenes = [scenes.Scene(**d) for d in scene_dicts]
    unet.train(), text_encoder.train()
    t0, losses = time.monotonic(), []
    for step in range(start, cfg.unet_steps):
        if not phase.spend():
            phase.maybe_save(objects, step, force=True)
            return None
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg.unet_steps, cfg.unet_lr, cfg.warmup)
        rng = np.random.default_rng([cfg.seed, step])  # the data stream depends only on the step: resumable
        idx = rng.integers(len(all_scenes), size=cfg.unet_batch)
        captions = [all_scenes[i].caption(rng) for i in idx]
        captions = ["" if rng.random() < cfg.uncond_prob else c for c in captions]
        ids = tokenizer(
            captions, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt"
        ).input_ids
        x0 = latents[torch.from_numpy(idx)]
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (len(idx),), generator=gen)
        xt = noise_schedule.add_noise(x0, noise, t)
        cond = text_encoder(ids).last_hidden_state
        target = noise if cfg.prediction_type == "epsilon" else noise_schedule.get_velocity(x0, noise, t)
        loss = F.mse_loss(unet(xt, t, encoder_hidden_states=cond).sample, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update_parameters(torch.nn.ModuleDict({"unet": unet, "text_encoder": text_encoder}))
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            log.info(
                "unet %d/%d  loss %.4f  %.2f s/step",
                step + 1,
                cfg.unet_steps,
                np.mean(losses[-100:]),
                (time.monotonic() - t0) / len(losses),
            )
        phase.maybe_save(objects, step + 1)
    phase.maybe_save(objects, cfg.unet_steps, force=True)
    return ema.module["unet"], ema.module["text_encoder"]


def _scheduler_config(cfg: TrainConfig) -> dict:
    """SD's noise schedule (PNDM config as SD 1.x ships it) with this run's prediction type."""
    return {**SD_SCHEDULER, "prediction_type": cfg.prediction_type}


def save_folder(out: Path, text_encoder, unet, vae, cfg: TrainConfig) -> None:
    """An ordinary diffusers folder (StableDiffusionPipeline), weights stored in FP16."""
    out.mkdir(parents=True, exist_ok=True)
    word_bpe_files(out / "tokenizer", scenes.WORDS, "<|endoftext|>", MAX_TOKENS)
    for name, module in (("text_encoder", text_encoder), ("unet", unet), ("vae", vae)):
        module.to(torch.float16).save_pretrained(out / name)
        module.to(torch.float32)
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(_scheduler_config(cfg), indent=2))
    (out / "model_index.json").write_text(json.dumps(sd_model_index("PNDMScheduler"), indent=2))
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="state for resuming (kept between runs)")
    p.add_argument("--out", type=Path, required=True, help="where the diffusers folder is written")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--max-steps-this-run", type=int, help="stop after this many optimiser steps (resume later)")
    for name, value in asdict(TrainConfig()).items():
        p.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    cfg = TrainConfig(**{k: getattr(args, k) for k in asdict(TrainConfig())})
    if args.threads:
        torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    saved = args.work / "config.json"
    if saved.exists() and json.loads(saved.read_text()) != asdict(cfg):
        raise SystemExit(f"{args.work} holds a run with other settings; use another --work or the same settings")
    saved.write_text(json.dumps(asdict(cfg), indent=2))

    tok_dir = args.work / "tokenizer"
    word_bpe_files(tok_dir, scenes.WORDS, "<|endoftext|>", MAX_TOKENS)
    from transformers import CLIPTokenizerFast

    tokenizer = CLIPTokenizerFast.from_pretrained(tok_dir)
    torch.manual_seed(cfg.seed)
    text_encoder, unet, vae = build_models(len(tokenizer))
    for name, m in (("text encoder", text_encoder), ("unet", unet), ("vae", vae)):
        log.info("%s: %.2f M parameters", name, sum(p.numel() for p in m.parameters()) / 1e6)
    t0 = time.monotonic()
    budget = [args.max_steps_this_run]
    if not train_vae(vae, cfg, args.work, budget):
        log.info("stopped during the VAE phase; run the same command again to resume")
        return
    latents, scene_dicts = encode_scenes(vae, cfg, args.work)
    trained = train_unet(text_encoder, unet, tokenizer, latents, scene_dicts, cfg, args.work, budget)
    if trained is None:
        log.info("stopped during the UNet phase; run the same command again to resume")
        return
    unet, text_encoder = trained
    save_folder(args.out, text_encoder.eval(), unet.eval(), vae.eval(), cfg)
    log.info("saved %s (%.1f min this run)", args.out, (time.monotonic() - t0) / 60)


if __name__ == "__main__":
    main()
