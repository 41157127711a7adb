"""CLIP tokenization from the bundle's tokenizer.json with the `tokenizers` library alone."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from diffrt.bundle import TokenizerInfo

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
