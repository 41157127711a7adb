"""CLIP tokenization from the bundle's tokenizer.json with the `tokenizers` library alone."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from diffrt.bundle import TokenizerInfo
from diffrt.engine import prompts as syntax

log = logging.getLogger(__name__)


class ClipTokenizer:
    """Prompts -> (B, max_length) int32 ids: bos, tokens, eos, then the checkpoint's pad id."""

    def __init__(self, path: Path, info: TokenizerInfo):
        self.info = info
        self._tok = Tokenizer.from_file(str(path))
        self._tok.no_padding()
        self._tok.no_truncation()

    def __call__(self, prompts: list[str]) -> np.ndarray:
        n = self.info.max_length
        ids = np.full((len(prompts), n), self.info.pad_id, dtype=np.int32)
        for row, enc in zip(ids, self._tok.encode_batch(prompts)):
            tokens = enc.ids  # bos ... eos, added by the tokenizer's post-processor
            if len(tokens) > n:
                dropped = self._tok.decode(tokens[n - 1 : -1]).replace("</w>", " ").strip()
                log.warning(
                    "prompt is %d tokens over the %d-token limit; dropped: %r",
                    len(tokens) - n,
                    n,
                    dropped if len(dropped) < 80 else dropped[:77] + "...",
                )
                tokens = tokens[: n - 1] + [self.info.eos_id]  # CLIP keeps eos last
            row[: len(tokens)] = tokens
        return ids

    def chunks(self, prompt: str, max_chunks: int = 1, quiet: bool = False) -> list[syntax.Chunk]:
        """A prompt in A1111's syntax as at most `max_chunks` weighted chunks (warning about what is dropped,
        unless `quiet`). With one chunk allowed there is no comma backtrack: the first 75 tokens are kept, as
        diffusers keeps."""
        parsed = syntax.parse(prompt)
        texts = [f[0] for f in parsed if f is not None]
        encoded = iter(self._tok.encode_batch(texts, add_special_tokens=False)) if texts else iter(())
        pieces = [None if f is None else (next(encoded).ids, f[1]) for f in parsed]
        out = syntax.chunk(pieces, self.comma_id if max_chunks > 1 else None, self.info.max_length - 2)
        if not quiet:
            syntax.log_dropped(out, max_chunks, self._tok.decode)
        return out[:max_chunks]

    @property
    def comma_id(self) -> int | None:
        return self._tok.token_to_id(",</w>")

    def rows(self, chunks: list[syntax.Chunk]) -> tuple[np.ndarray, np.ndarray]:
        """Chunks as encoder rows: ids (n, max_length) int32 (bos, tokens, eos, pad) and weights (n, max_length)."""
        n = self.info.max_length
        ids = np.full((len(chunks), n), self.info.pad_id, dtype=np.int32)
        weights = np.ones((len(chunks), n), dtype=np.float32)
        for row, w, c in zip(ids, weights, chunks):
            k = len(c.tokens)
            row[0], row[1 : k + 1], row[k + 1] = self.info.bos_id, c.tokens, self.info.eos_id
            w[1 : k + 1] = c.weights
        return ids, weights
