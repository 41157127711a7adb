"""CLIP tokenization from the bundle's tokenizer.json with the `tokenizers` library alone."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from diffrt.bundle import TokenizerInfo
from diffrt.engine import prompts as syntax

log = logging.getLogger(__name__)
_NAMED = re.compile(r"embedding:([\w.\-]+)")  # ComfyUI's way to call an embedding


class ClipTokenizer:
    """Prompts -> (B, max_length) int32 ids: bos, tokens, eos, then the checkpoint's pad id."""

    def __init__(self, path: Path, info: TokenizerInfo):
        self.info = info
        self._tok = Tokenizer.from_file(str(path))
        self._tok.no_padding()
        self._tok.no_truncation()
        self.vocab = self._tok.get_vocab_size()
        self._embeddings: dict[int, list[tuple[tuple[int, ...], tuple[int, ...]]]] = {}
        self._names: set[str] = set()

    def use_embeddings(self, counts: dict[str, int], first_id: int) -> None:
        """Prompts call these textual inversion embeddings by name (name -> its number of vectors): each
        occurrence of a name's tokens becomes ids first_id, first_id + 1, ... (rows after the token table)."""
        self._embeddings = {}  # first token of a name -> [(the name's tokens, its ids)], longest name first
        self._names = {name.lower() for name in counts}
        next_id = first_id
        for name, n in counts.items():
            tokens = tuple(self._tok.encode(name, add_special_tokens=False).ids)
            if tokens:
                self._embeddings.setdefault(tokens[0], []).append((tokens, tuple(range(next_id, next_id + n))))
            next_id += n
        for candidates in self._embeddings.values():
            candidates.sort(key=lambda c: -len(c[0]))

    def named_embeddings(self, prompt: str, quiet: bool = False) -> str:
        """ComfyUI's `embedding:NAME`: the bare name where NAME is loaded (which then stands for its vectors);
        otherwise the text stays as written, with a warning naming what is loaded."""
        if "embedding:" not in prompt:
            return prompt

        def name(m: re.Match) -> str:
            if m.group(1).lower() in self._names:
                return m.group(1)
            if not quiet:
                loaded = ", ".join(sorted(self._names)) or "none (--embeddings DIR loads them)"
                log.warning("embedding %r is not loaded; read as text. Loaded: %s", m.group(1), loaded)
            return m.group(0)

        return _NAMED.sub(name, prompt)

    def _swap(self, ids: list[int]) -> list[int | tuple[int, ...]]:
        """Token ids with every embedding name replaced by the tuple of its ids."""
        if not self._embeddings:
            return ids
        out: list[int | tuple[int, ...]] = []
        i = 0
        while i < len(ids):
            for tokens, rows in self._embeddings.get(ids[i], ()):
                if tuple(ids[i : i + len(tokens)]) == tokens:
                    out.append(rows)
                    i += len(tokens)
                    break
            else:
                out.append(ids[i])
                i += 1
        return out

    def _decode(self, ids) -> str:
        return self._tok.decode([i for i in ids if i < self.vocab])

    def __call__(self, prompts: list[str]) -> np.ndarray:
        n = self.info.max_length
        ids = np.full((len(prompts), n), self.info.pad_id, dtype=np.int32)
        for row, enc in zip(ids, self._tok.encode_batch([self.named_embeddings(p) for p in prompts])):
            tokens = enc.ids  # bos ... eos, added by the tokenizer's post-processor
            if self._embeddings:
                swapped = self._swap(tokens[1:-1])
                tokens = [tokens[0], *(t for x in swapped for t in (x if isinstance(x, tuple) else (x,))), tokens[-1]]
            if len(tokens) > n:
                dropped = self._decode(tokens[n - 1 : -1]).replace("</w>", " ").strip()
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
        parsed = syntax.parse(self.named_embeddings(prompt, quiet))
        texts = [f[0] for f in parsed if f is not None]
        encoded = iter(self._tok.encode_batch(texts, add_special_tokens=False)) if texts else iter(())
        pieces = [None if f is None else (self._swap(next(encoded).ids), f[1]) for f in parsed]
        out = syntax.chunk(pieces, self.comma_id if max_chunks > 1 else None, self.info.max_length - 2)
        if not quiet:
            syntax.log_dropped(out, max_chunks, self._decode)
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
