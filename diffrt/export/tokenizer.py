"""CLIP tokenizer → a `tokenizer.json` the `tokenizers` library loads alone, plus its special ids."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

from diffrt.bundle import TokenizerInfo
from diffrt.errors import BadInput

CLIP_MAX_LENGTH = 77


def export_tokenizer(tokenizer_dir: Path, out_dir: Path) -> TokenizerInfo:
    """Write out_dir/tokenizer.json from a checkpoint's tokenizer folder and return the CLIP ids."""
    from transformers import CLIPTokenizerFast

    try:
        tok = CLIPTokenizerFast.from_pretrained(tokenizer_dir)
    except Exception as e:
        raise BadInput(
            f"could not load the tokenizer in {tokenizer_dir} ({str(e)[:120]}); the checkpoint's "
            "tokenizer/ folder needs vocab.json and merges.txt"
        ) from None
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.backend_tokenizer.save(str(out_dir / "tokenizer.json"))
    max_length = min(int(tok.model_max_length), CLIP_MAX_LENGTH) if tok.model_max_length else CLIP_MAX_LENGTH
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return TokenizerInfo(max_length=max_length, bos_id=tok.bos_token_id, eos_id=tok.eos_token_id, pad_id=pad)


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes used by byte-level BPE (GPT-2/CLIP), in CLIP's vocabulary order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(extra))]


def word_bpe_files(folder: Path, words: list[str], pad: str, max_length: int = CLIP_MAX_LENGTH) -> None:
    """Write a small CLIP-format BPE (vocab.json, merges.txt, configs): the byte symbols, their word-final forms,
    and merges that make each of `words` one token. Other text still tokenizes, byte by byte."""
    symbols = _byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols]
    merges: list[tuple[str, str]] = []
    rank: dict[tuple[str, str], int] = {}
    for word in words:
        # Merge what BPE (lowest rank first) leaves of the word until it is one token. New merges rank last, so
        # the words before keep their single tokens.
        while len(parts := _bpe(list(word[:-1]) + [word[-1] + "</w>"], rank)) > 1:
            pair = (parts[0], parts[1])
            rank[pair] = len(merges)
            merges.append(pair)
            vocab.append(pair[0] + pair[1])
    _write_clip_files(folder, list(dict.fromkeys(vocab)), merges, pad, max_length)


def _bpe(parts: list[str], rank: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word: repeatedly join the adjacent pair with the lowest merge rank."""
    while len(parts) > 1:
        pairs = [(rank.get(p, len(rank)), i) for i, p in enumerate(zip(parts, parts[1:]))]
        best, i = min(pairs)
        if best == len(rank):
            break
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2 :]
    return parts


def clip_bpe_files(folder: Path, pad: str) -> None:
    """Write CLIP's vocab.json/merges.txt (49408 tokens) from the BPE data open-clip-torch ships."""
    spec = importlib.util.find_spec("open_clip")
    data = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz" if spec else None
    if data is None or not data.is_file():
        raise BadInput(
            "single-file checkpoints carry no tokenizer and CLIP's vocabulary was not found; "
            "`pip install open-clip-torch` (it ships the vocabulary) or pass --tokenizer DIR"
        )
    lines = gzip.decompress(data.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = _byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    _write_clip_files(folder, vocab, merges, pad)


def _write_clip_files(
    folder: Path, vocab: list[str], merges: list[tuple[str, ...]], pad: str, max_length: int = CLIP_MAX_LENGTH
) -> None:
    vocab = vocab + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad,
    }
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "do_lower_case": True, **special}
        )
    )
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
