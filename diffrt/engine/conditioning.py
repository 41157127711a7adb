"""What the UNet is conditioned on besides the noisy sample and the timestep, built once per generation.

SD 1.x/2.x: one CLIP encoder's last hidden state. SDXL (Podell et al. 2023): both encoders' penultimate hidden
states side by side, the second encoder's pooled projection (`text_embeds`) and six micro-conditioning numbers
(`time_ids`: original size, crop top-left, target size). LCM (Luo et al. 2023): the guidance scale as a
sinusoidal embedding (`timestep_cond`) in place of classifier-free guidance. Which of these a bundle needs is
read from its UNet spec's inputs. With classifier-free guidance every array holds the negative rows first.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from diffrt.engine import prompts
from diffrt.engine.backends import Session
from diffrt.engine.tokenizer import ClipTokenizer
from diffrt.errors import BadInput

Size = tuple[int, int]  # (height, width) or (top, left), in pixels


@dataclass(frozen=True)
class TextEncoder:
    tokenizer: ClipTokenizer
    session: Session


@dataclass(frozen=True)
class Prompts:
    """One prompt per image for each text encoder, and the negative prompts (None: not given)."""

    prompts: list[str]
    prompts_2: list[str]  # SDXL's second encoder; the same as `prompts` unless the caller says otherwise
    negative: str | None
    negative_2: str | None


def encode(
    encoders: list[TextEncoder], texts: list[list[str]], timings: dict[str, float], syntax: str = "a1111"
) -> tuple[np.ndarray, np.ndarray | None]:
    """Hidden states of every encoder concatenated on the feature axis (B, 77, sum D), and the pooled
    projection (B, P) of the encoder that has one (SDXL's second), else None. `syntax` "a1111" reads attention
    weights and BREAK (diffrt.engine.prompts), each encoder weighting its own output; "plain" tokenizes the text
    as it is. Adds to timings' "tokenizer" and "text_encoder" seconds."""
    hidden, pooled = [], None
    for encoder, batch in zip(encoders, texts):
        t0 = time.perf_counter()
        if syntax == "plain":
            ids, weights = encoder.tokenizer(batch), None
        else:
            ids, weights = encoder.tokenizer.rows([encoder.tokenizer.chunks(text)[0] for text in batch])
        t1 = time.perf_counter()
        out = encoder.session.run({"input_ids": ids})
        states = out["text_embeddings"] if weights is None else prompts.emphasize(out["text_embeddings"], weights)
        t2 = time.perf_counter()
        timings["tokenizer"] = timings.get("tokenizer", 0.0) + t1 - t0
        timings["text_encoder"] = timings.get("text_encoder", 0.0) + t2 - t1
        hidden.append(states)
        pooled = out.get("text_embeds", pooled)
    return np.concatenate(hidden, axis=-1), pooled


def text_conditioning(
    encoders: list[TextEncoder],
    p: Prompts,
    cfg: bool,
    zero_negative: bool,
    timings: dict[str, float],
    syntax: str = "a1111",
) -> dict[str, np.ndarray]:
    """`encoder_hidden_states` (2B|B, 77, D) and, for SDXL, `text_embeds` (2B|B, P).

    An absent negative prompt is the empty string, or zeros where the checkpoint asks for them
    (`force_zeros_for_empty_prompt`, SDXL); the second encoder's negative defaults to the first's."""
    n = len(p.prompts)
    zeros = cfg and zero_negative and p.negative is None
    texts = [p.prompts, p.prompts_2]
    if cfg and not zeros:
        negative = p.negative or ""
        negative_2 = p.negative_2 or negative
        texts = [[negative] * n + p.prompts, [negative_2] * n + p.prompts_2]
    hidden, pooled = encode(encoders, texts[: len(encoders)], timings, syntax)
    if zeros:
        hidden = np.concatenate([np.zeros_like(hidden), hidden])
        pooled = None if pooled is None else np.concatenate([np.zeros_like(pooled), pooled])
    out = {"encoder_hidden_states": hidden}
    if pooled is not None:
        out["text_embeds"] = pooled
    return out


def time_ids(
    original_size: Size,
    crops_coords_top_left: Size,
    target_size: Size,
    n: int,
    cfg: bool,
    width: int = 6,
    aesthetic: tuple[float, float] = (6.0, 2.5),
) -> np.ndarray:
    """SDXL's micro-conditioning, (2n|n, width), negative rows first: original (h, w), crop (top, left), then
    target (h, w) (width 6), or the aesthetic score (width 5: the refiner's `requires_aesthetics_score`), whose
    negative rows carry the negative score."""
    head = [*original_size, *crops_coords_top_left]
    if width == 5:
        positive, negative = [*head, aesthetic[0]], [*head, aesthetic[1]]
    elif width == 6:
        positive = negative = [*head, *target_size]
    else:
        raise BadInput(f"this bundle's UNet takes {width} time ids; diffrt knows SDXL's 6 and the refiner's 5")
    rows = [negative] * n + [positive] * n if cfg else [positive] * n
    return np.asarray(rows, np.float32)


def guidance_embedding(guidance_scale: float, dim: int, rows: int) -> np.ndarray:
    """LCM's guidance condition (rows, dim): sinusoidal embedding of w = 1000 * (guidance_scale - 1), the
    transformer-style timestep embedding with frequencies 10000^(-k / (dim/2 - 1)), sines then cosines."""
    half = dim // 2
    step = np.log(np.float32(10000.0)) / np.float32(half - 1)  # float32 throughout, as diffusers computes it
    freqs = np.exp(np.arange(half, dtype=np.float32) * -step)
    angles = np.float32((guidance_scale - 1.0) * 1000.0) * freqs
    emb = np.concatenate([np.sin(angles), np.cos(angles)])
    if dim % 2:
        emb = np.concatenate([emb, np.zeros(1, np.float32)])
    return np.tile(emb.astype(np.float32), (rows, 1))
