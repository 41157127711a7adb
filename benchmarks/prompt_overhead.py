"""Host cost of reading a prompt in A1111's syntax: parse, tokenize, chunk, and weight the encoder's output.

    python benchmarks/prompt_overhead.py BUNDLE [--runs 2000]

Timed per prompt of about 75 tokens with weights: `chunks()` + `rows()` (parse, tokenize, chunk, ids and
weights), and `emphasize()` on a (1, 77, D) hidden state of the bundle's width and of SDXL's 2048; the plain
tokenizer beside it; and a prompt three times as long (three chunks, comma backtrack). Medians; target < 1 ms
for the whole at 75 tokens.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from diffrt.bundle import TOKENIZER, load_manifest
from diffrt.engine.prompts import emphasize
from diffrt.engine.tokenizer import ClipTokenizer

TARGET_MS = 1.0
PROMPT = (
    "masterpiece, best quality, (a red fox:1.3) standing in [deep] snow, ((golden hour)), soft light, "
    "pine forest, mountains in the distance, \\(detailed fur\\), sharp focus, (bokeh:0.8), 85mm photo"
)


def median_ms(fn, runs: int) -> float:
    samples = []
    for _ in range(runs + 20):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples[20:]) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--runs", type=int, default=2000)
    args = ap.parse_args()
    m = load_manifest(args.bundle)
    tok = ClipTokenizer(args.bundle / TOKENIZER, m.tokenizer)
    (c,) = tok.chunks(PROMPT, max_chunks=1, quiet=True)
    width = m.components["unet"].spec.inputs[2].shape[2]
    hidden = np.random.default_rng(0).standard_normal((1, m.tokenizer.max_length, width)).astype(np.float32)
    _, weights = tok.rows([c])
    parse_ms = median_ms(lambda: tok.rows(tok.chunks(PROMPT, quiet=True)), args.runs)
    weight_ms = median_ms(lambda: emphasize(hidden, weights), args.runs)
    wide = np.random.default_rng(0).standard_normal((1, m.tokenizer.max_length, 2048)).astype(np.float32)
    wide_ms = median_ms(lambda: emphasize(wide, weights), args.runs)
    plain_ms = median_ms(lambda: tok([PROMPT]), args.runs)
    long = ", ".join([PROMPT] * 3)
    chunks = tok.chunks(long, max_chunks=3, quiet=True)
    long_ms = median_ms(lambda: tok.rows(tok.chunks(long, max_chunks=3, quiet=True)), args.runs)
    total = parse_ms + max(weight_ms, wide_ms)
    print(f"prompt: {len(c.tokens)} tokens, {len(set(c.weights))} distinct weights; hidden width {width}")
    print(f"parse + tokenize + chunk  {parse_ms:.3f} ms")
    print(f"weights + mean restore    {weight_ms:.3f} ms")
    print(f"  at SDXL's width 2048    {wide_ms:.3f} ms")
    print(f"plain tokenizer           {plain_ms:.3f} ms")
    print(f"{sum(len(c.tokens) for c in chunks)} tokens in {len(chunks)} chunks  {long_ms:.3f} ms (parse to rows)")
    print(f"total {total:.3f} ms (target < {TARGET_MS:g} ms): {'ok' if total < TARGET_MS else 'over'}")


if __name__ == "__main__":
    main()
