"""Prompts as AUTOMATIC1111's web UI reads them: attention weights, BREAK, and 75-token chunks.

Syntax ("a1111", the default): `(text)` multiplies the weight of its tokens by 1.1, `[text]` divides it by 1.1,
`(text:1.3)` sets the factor to 1.3; brackets nest and multiply. `\\(`, `\\)`, `\\[`, `\\]`, `\\\\` are literal
characters. A closing bracket with no opener is literal text; an opener never closed weights everything after it
(A1111 does both). `(text:abc)` is not a weight: ":abc" stays text and the bracket counts as 1.1. `BREAK` (capital,
a word of its own) ends the current chunk. "plain" turns all of this off: the text is tokenized as it is.

Each chunk is BOS + 75 tokens + EOS, padded as the checkpoint's tokenizer pads. When a prompt fills a chunk, the
chunk ends after its last comma if that comma is at most 20 tokens back (A1111's comma backtrack). The text
encoder's output is multiplied per token by the weights, then rescaled so its mean is what it was (A1111).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

SYNTAXES = ("a1111", "plain")
CHUNK_TOKENS = 75  # between BOS and EOS: CLIP's 77 positions
COMMA_BACKTRACK = 20  # tokens a filled chunk may give back to end at a comma
UP, DOWN = 1.1, 1 / 1.1
BREAK = None  # a parsed prompt's chunk break
_ESCAPED = set("()[]\\")
_WEIGHT = re.compile(r":\s*([+-]?[.\d]+)\s*\)")
_BREAK = re.compile(r"\s*\bBREAK\b\s*")

Fragment = tuple[str, float]


def parse(text: str) -> list[Fragment | None]:
    """(text, weight) fragments in order, None where a BREAK is; neighbours of equal weight merged."""
    out: list[list] = []  # [text, weight] or None
    opened: list[tuple[str, int]] = []  # (bracket, index in out where it opened)
    pending: list[str] = []  # plain characters not yet flushed

    def flush() -> None:
        if pending:
            for i, part in enumerate(_BREAK.split("".join(pending))):
                if i:
                    out.append(None)
                out.append([part, 1.0])
            pending.clear()

    def close(kind: str, factor: float) -> None:
        flush()
        start = next(i for k, i in reversed(opened) if k == kind)
        opened.remove((kind, start))
        for fragment in out[start:]:
            if fragment is not None:
                fragment[1] *= factor

    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            nxt = text[i + 1 : i + 2]
            if nxt in _ESCAPED and nxt:
                flush()
                out.append([nxt, 1.0])
                i += 2
            else:
                i += 1  # a backslash before anything else is dropped, as A1111 drops it
            continue
        if c in "([":
            flush()
            opened.append((c, len(out)))
        elif c == ":" and any(k == "(" for k, _ in opened) and (m := _WEIGHT.match(text, i)):
            try:
                factor = float(m.group(1))
            except ValueError:  # "1.2.3": not a number (A1111 fails here); the colon stays text
                pending.append(c)
            else:
                close("(", factor)
                i = m.end()
                continue
        elif c == ")" and any(k == "(" for k, _ in opened):
            close("(", UP)
        elif c == "]" and any(k == "[" for k, _ in opened):
            close("[", DOWN)
        else:
            pending.append(c)
        i += 1
    flush()
    for kind, start in reversed(opened):  # never closed: weights everything after it
        for fragment in out[start:]:
            if fragment is not None:
                fragment[1] *= UP if kind == "(" else DOWN
    merged: list[Fragment | None] = []
    for fragment in out:
        if fragment is not None and merged and merged[-1] is not None and merged[-1][1] == fragment[1]:
            merged[-1] = (merged[-1][0] + fragment[0], fragment[1])
        else:
            merged.append(None if fragment is None else (fragment[0], fragment[1]))
    return merged or [("", 1.0)]


@dataclass(frozen=True)
class Chunk:
    tokens: tuple[int, ...]  # at most CHUNK_TOKENS, without BOS/EOS
    weights: tuple[float, ...]


EMPTY = Chunk((), ())  # pads a shorter prompt to the batch's number of chunks: BOS, EOS, padding


Ids = list[int | tuple[int, ...]]  # a tuple: a textual inversion embedding's vectors, never split between chunks


def chunk(pieces: Sequence[tuple[Ids, float] | None], comma: int | None, size: int = CHUNK_TOKENS) -> list[Chunk]:
    """A1111's chunking of tokenized fragments ((ids, weight), or None for BREAK) into chunks of `size` tokens;
    `comma` None: no comma backtrack. An embedding that does not fit in what is left of a chunk starts the next."""
    chunks: list[Chunk] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def end() -> None:
        nonlocal tokens, weights, last_comma
        chunks.append(Chunk(tuple(tokens), tuple(weights)))
        tokens, weights, last_comma = [], [], -1

    for piece in pieces:
        if piece is None:
            end()
            continue
        ids, weight = piece
        for token in ids:
            if token == comma:
                last_comma = len(tokens)
            elif len(tokens) == size and last_comma != -1 and len(tokens) - last_comma <= COMMA_BACKTRACK:
                cut = last_comma + 1
                moved, moved_weights = tokens[cut:], weights[cut:]
                tokens, weights = tokens[:cut], weights[:cut]
                end()
                tokens, weights = moved, moved_weights
            if len(tokens) == size:
                end()
            if isinstance(token, tuple):
                if len(tokens) + len(token) > size:
                    end()
                tokens.extend(token)
                weights.extend([weight] * len(token))
                continue
            tokens.append(token)
            weights.append(weight)
    if tokens or not chunks:
        end()
    return chunks


def emphasize(hidden: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(rows, T, D) hidden states times per-token weights (rows, T), each row rescaled to its own former mean
    (A1111 rescales its whole batch at once; per row, a request's picture does not depend on its batch-mates)."""
    if np.all(weights == 1):
        return hidden
    before = hidden.mean(axis=(1, 2), keepdims=True, dtype=np.float64)
    out = hidden * weights[:, :, None].astype(hidden.dtype)
    after = out.mean(axis=(1, 2), keepdims=True, dtype=np.float64)
    return (out * (before / after).astype(hidden.dtype)).astype(hidden.dtype)


def describe(tokens: Sequence[int], decode) -> str:
    text = decode(list(tokens)).replace("</w>", " ").strip()
    return text if len(text) < 80 else text[:77] + "..."


def log_dropped(chunks: list[Chunk], kept: int, decode) -> None:
    dropped = [t for c in chunks[kept:] for t in c.tokens]
    if dropped:
        log.warning(
            "prompt needs %d chunks; this bundle takes %d (export --prompt-chunks sets it): dropped %d tokens: %r",
            len(chunks),
            kept,
            len(dropped),
            describe(dropped, decode),
        )
