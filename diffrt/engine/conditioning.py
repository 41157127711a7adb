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
    clip_skips: int = 0  # A1111 clip skip values 1 .. this the graph takes (its `clip_skip` input); 0: no input
    table: np.ndarray | None = None  # (vocab, D) token embeddings, where the graph takes `token_embeds`
    extra: np.ndarray | None = None  # (m, D) textual inversion vectors: the rows of ids vocab .. vocab + m - 1

    def feeds(self, ids: np.ndarray, clip_skip: int) -> dict[str, np.ndarray]:
        out = {"input_ids": ids}
        if self.table is not None:
            added = ids >= len(self.table)
            if added.any():  # the graph sees token 0 there (it places only the pooled output by ids), as A1111
                out["input_ids"] = np.where(added, 0, ids).astype(np.int32)
                embeds = self.table[out["input_ids"]]
                embeds[added] = self.extra[ids[added] - len(self.table)]
                out["token_embeds"] = embeds
            else:
                out["token_embeds"] = self.table[ids]
        if self.clip_skips:
            out["clip_skip"] = np.array([clip_skip - 1], np.int32)
        return out


@dataclass(frozen=True)
class Prompts:
    """One prompt per image for each text encoder, and the negative prompts (None: not given)."""

    prompts: list[str]
    prompts_2: list[str]  # SDXL's second encoder; the same as `prompts` unless the caller says otherwise
    negative: str | None
    negative_2: str | None

    def texts(self, cfg: bool, zero_negative: bool) -> tuple[list[list[str]], bool]:
        """What each encoder encodes (negative rows first with classifier-free guidance), and whether the
        negative rows are zeros instead (no negative prompt, and the checkpoint asks for zeros)."""
        n, zeros = len(self.prompts), cfg and zero_negative and self.negative is None
        if not cfg or zeros:
            return [self.prompts, self.prompts_2], zeros
        negative = self.negative or ""
        negative_2 = self.negative_2 or negative
        return [[negative] * n + self.prompts, [negative_2] * n + self.prompts_2], False


def encode(
    encoders: list[TextEncoder],
    texts: list[list[str]],
    timings: dict[str, float],
    syntax: str = "a1111",
    max_chunks: int = 1,
    clip_skip: int = 1,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Hidden states of every encoder concatenated on the feature axis (B, 77 k, sum D), and the pooled
    projection (B, P) of the encoder that has one (SDXL's second), else None.

    `syntax` "a1111" reads attention weights and BREAK (diffrt.engine.prompts) and splits a prompt into up to
    `max_chunks` windows of 75 tokens: each window is encoded on its own and weighted by its encoder, the windows
    are joined along the sequence (k = the most any text needs, shorter texts padded with empty windows, as
    A1111 pads), and the pooled output is the first window's. "plain" tokenizes each text as it is into one
    window (diffusers' truncation). `clip_skip` (A1111's numbering, 1: the usual layer) takes each encoder's
    hidden states that many layers before its output, less one. Adds to timings' "tokenizer" and "text_encoder"
    seconds."""
    t0 = time.perf_counter()
    if syntax == "plain":
        windows = [[(e.tokenizer(batch), None)] for e, batch in zip(encoders, texts)]
    else:
        chunked = [[e.tokenizer.chunks(text, max_chunks) for text in batch] for e, batch in zip(encoders, texts)]
        k = max(len(c) for rows in chunked for c in rows)  # = window_count()
        windows = [
            [e.tokenizer.rows([c[i] if i < len(c) else prompts.EMPTY for c in rows]) for i in range(k)]
            for e, rows in zip(encoders, chunked)
        ]
    timings["tokenizer"] = timings.get("tokenizer", 0.0) + time.perf_counter() - t0
    hidden, pooled = [], None
    for encoder, per_window in zip(encoders, windows):
        states = []
        for i, (ids, weights) in enumerate(per_window):
            t1 = time.perf_counter()
            out = encoder.session.run(encoder.feeds(ids, clip_skip))
            z = out["text_embeddings"]
            states.append(z if weights is None else prompts.emphasize(z, weights))
            timings["text_encoder"] = timings.get("text_encoder", 0.0) + time.perf_counter() - t1
            if i == 0:
                pooled = out.get("text_embeds", pooled)
        hidden.append(np.concatenate(states, axis=1) if len(states) > 1 else states[0])
    return np.concatenate(hidden, axis=-1), pooled


def window_count(encoders: list[TextEncoder], texts: list[list[str]], syntax: str, max_chunks: int) -> int:
    """The number of 75-token windows encode() gives these texts (the UNet's sequence is 77 times this).
    Images of one call share it: a batcher runs prompts of different counts in separate calls."""
    if syntax == "plain":
        return 1
    return max(len(e.tokenizer.chunks(t, max_chunks, quiet=True)) for e, batch in zip(encoders, texts) for t in batch)


def text_conditioning(
    encoders: list[TextEncoder],
    p: Prompts,
    cfg: bool,
    zero_negative: bool,
    timings: dict[str, float],
    syntax: str = "a1111",
    max_chunks: int = 1,
    clip_skip: int = 1,
) -> dict[str, np.ndarray]:
    """`encoder_hidden_states` (2B|B, 77 k, D) and, for SDXL, `text_embeds` (2B|B, P); see encode().

    An absent negative prompt is the empty string, or zeros where the checkpoint asks for them
    (`force_zeros_for_empty_prompt`, SDXL); the second encoder's negative defaults to the first's."""
    texts, zeros = p.texts(cfg, zero_negative)
    hidden, pooled = encode(encoders, texts[: len(encoders)], timings, syntax, max_chunks, clip_skip)
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
