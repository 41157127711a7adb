"""A1111's prompt syntax: the parser and chunker on their own, and whole pictures against diffusers fed the
`prompt_embeds` of a reference weighting written here (a recursive parser over transformers' CLIP, independent
of diffrt's scanner), on the tiny SD1 and SDXL checkpoints. Tolerance 1/255 per pixel, FP32 on ONNX Runtime CPU.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from diffrt import Pipeline
from diffrt.engine.prompts import Chunk, chunk, emphasize, parse

TOL = 1 / 255
WEIGHTED = "a (cute:1.4) [[red]] narwhal, ((sunset)) \\(sea\\)"
NEGATIVE = "(blue square:0.6), [blurry"
STEPS, SAMPLER = 5, "euler"


# --- the parser, case by case --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("plain words", [("plain words", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("[less]", [("less", 1 / 1.1)]),
        ("(a:1.3) b", [("a", 1.3), (" b", 1.0)]),
        ("((a)) (b:0.5)", [("a", 1.1 * 1.1), (" ", 1.0), ("b", 0.5)]),
        ("(a (b:2))", [("a ", 1.1), ("b", 2 * 1.1)]),
        ("(x:-1.5)", [("x", -1.5)]),
        ("\\(literal\\) \\[x\\] \\\\", [("(literal) [x] \\", 1.0)]),
        ("(unclosed", [("unclosed", 1.1)]),  # weights the rest, as A1111
        ("[unclosed", [("unclosed", 1 / 1.1)]),
        ("stray ) and ]", [("stray ) and ]", 1.0)]),  # closers with no opener are text
        ("(red:abc)", [("red:abc", 1.1)]),  # not a number: the colon is text, the bracket counts 1.1
        ("(red:1.2.3)", [("red:1.2.3", 1.1)]),  # A1111 raises here
        ("no bracket:1.3)", [("no bracket:1.3)", 1.0)]),
        ("(a)(b)", [("ab", 1.1)]),
        ("a BREAK b", [("a", 1.0), None, ("b", 1.0)]),
        ("(a BREAK b)", [("a", 1.1), None, ("b", 1.1)]),  # a BREAK inside brackets still breaks
        ("BREAKFAST", [("BREAKFAST", 1.0)]),
        ("", [("", 1.0)]),
    ],
)
def test_parse(text, expected):
    got = parse(text)
    assert len(got) == len(expected), got
    for g, e in zip(got, expected):
        if e is None:
            assert g is None
        else:
            assert g[0] == e[0] and g[1] == pytest.approx(e[1], rel=1e-12)


def test_chunks_break_and_comma_backtrack():
    comma = 9
    words = [1] * 70 + [comma] + [2] * 10  # a comma 70 in: the chunk ends after it, the rest moves on
    chunks = chunk([(words, 1.0)], comma, size=75)
    assert [len(c.tokens) for c in chunks] == [71, 10] and chunks[0].tokens[-1] == comma
    assert [len(c.tokens) for c in chunk([(words, 1.0)], None, size=75)] == [75, 6]  # no backtrack asked
    far = [1] * 40 + [comma] + [2] * 50  # the comma is 35 back: too far, cut at 75
    assert [len(c.tokens) for c in chunk([(far, 1.0)], comma, size=75)] == [75, 16]
    broken = chunk([([1, 2], 1.5), None, ([3], 0.5)], comma, size=75)
    assert broken == [Chunk((1, 2), (1.5, 1.5)), Chunk((3,), (0.5,))]
    assert chunk([], comma) == [Chunk((), ())]


def test_emphasis_keeps_each_rows_mean():
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((2, 7, 5)).astype(np.float32) + 0.3
    weights = np.ones((2, 7), np.float32)
    assert emphasize(hidden, weights) is hidden
    weights[0, 2] = 1.5
    out = emphasize(hidden, weights)
    np.testing.assert_allclose(out.mean(axis=(1, 2)), hidden.mean(axis=(1, 2)), rtol=1e-5)
    np.testing.assert_array_equal(out[1], hidden[1])  # a batch-mate is untouched
    ratio = out[0, 2] / hidden[0, 2]
    np.testing.assert_allclose(ratio / (out[0, 0] / hidden[0, 0]), 1.5, rtol=1e-5)


# --- the reference: A1111's weighting, written again over transformers' CLIP ----------------------------------


def reference_parse(text: str) -> list[tuple[str, float]]:
    """Recursive descent over A1111's grammar (no BREAK): returns (text, weight) per run of characters."""
    out: list[tuple[str, float]] = []

    def group(i: int, close: str | None, scale: float) -> tuple[int, bool]:
        """Parse until `close`; returns (index after it, closed?). Weights are applied once the group ends."""
        start = len(out)
        while i < len(text):
            c = text[i]
            if c == "\\" and i + 1 < len(text) and text[i + 1] in "()[]\\":
                out.append((text[i + 1], 1.0))
                i += 2
            elif c in "([":
                i, _ = group(i + 1, ")" if c == "(" else "]", 1.1 if c == "(" else 1 / 1.1)
            elif close == ")" and c == ":":
                j = text.find(")", i)
                try:
                    factor = float(text[i + 1 : j].strip()) if j > 0 else None
                except ValueError:
                    factor = None
                if factor is None:
                    out.append((c, 1.0))
                    i += 1
                else:
                    scale_group(start, factor)
                    return j + 1, True
            elif c == close:
                scale_group(start, scale)
                return i + 1, True
            else:
                out.append((c, 1.0))
                i += 1
        if close is not None:
            scale_group(start, scale)  # never closed: weights what follows
        return i, False

    def scale_group(start: int, factor: float) -> None:
        out[start:] = [(t, w * factor) for t, w in out[start:]]

    group(0, None, 1.0)
    runs: list[tuple[str, float]] = []
    for t, w in out:
        if runs and runs[-1][1] == w:
            runs[-1] = (runs[-1][0] + t, w)
        else:
            runs.append((t, w))
    return runs or [("", 1.0)]


def reference_embeds(tokenizer, encoder, text: str, hidden_layer: int | None):
    """(1, 77, D) weighted hidden states and the (1, P) pooled output, as A1111 computes them for one chunk."""
    ids, weights = [], []
    for part, w in reference_parse(text):
        part_ids = tokenizer(part, add_special_tokens=False).input_ids
        ids += part_ids
        weights += [w] * len(part_ids)
    ids, weights = ids[:75], weights[:75]
    n = tokenizer.model_max_length
    row = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
    row += [tokenizer.pad_token_id] * (n - len(row))
    w = torch.tensor([1.0, *weights] + [1.0] * (n - len(weights) - 1))
    with torch.no_grad():
        out = encoder(torch.tensor([row]), output_hidden_states=hidden_layer is not None)
    z = out.last_hidden_state if hidden_layer is None else out.hidden_states[hidden_layer]
    mean = z.mean()
    z = z * w[None, :, None]
    z = z * (mean / z.mean())
    return z, getattr(out, "text_embeds", None)


@pytest.fixture(scope="module")
def sd1(sd1_bundle):
    return Pipeline.load(sd1_bundle, backend="ort-cpu")


@pytest.fixture(scope="module")
def sd1_reference(sd1_folder):
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(sd1_folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    return pipe


def ours(pipe, prompt, negative, latents, **kw):
    out = pipe(
        prompt,
        negative_prompt=negative,
        num_inference_steps=STEPS,
        scheduler=SAMPLER,
        latents=latents,
        height=latents.shape[2] * 8,
        width=latents.shape[3] * 8,
        upscale=False,
        output_type="np",
        **kw,
    )
    return out.images[0]


def latents(shape=(1, 4, 8, 8)):
    return np.random.default_rng(3).standard_normal(shape, dtype=np.float32)


def test_sd1_weighted_prompt_matches_diffusers_fed_the_reference_embeds(sd1, sd1_reference):
    ref = sd1_reference
    z = latents()
    cond, _ = reference_embeds(ref.tokenizer, ref.text_encoder, WEIGHTED, None)
    uncond, _ = reference_embeds(ref.tokenizer, ref.text_encoder, NEGATIVE, None)
    theirs = ref(
        prompt_embeds=cond,
        negative_prompt_embeds=uncond,
        num_inference_steps=STEPS,
        latents=torch.from_numpy(z.copy()),
        height=64,
        width=64,
        output_type="np",
    ).images[0]
    mine = ours(sd1, WEIGHTED, NEGATIVE, z)
    assert np.abs(mine - theirs).max() <= TOL
    # the tolerance separates: the same words unweighted, or one weight changed, move the picture further
    plain = ours(sd1, WEIGHTED, NEGATIVE, z, prompt_syntax="plain")
    nudged = ours(sd1, WEIGHTED.replace("((sunset))", "sunset"), NEGATIVE, z)  # one word's 1.21 dropped
    assert np.abs(plain - theirs).max() > 5 * TOL and np.abs(nudged - theirs).max() > 2 * TOL


def test_sd1_plain_prompt_is_what_it_was(sd1, sd1_reference):
    """A prompt with no syntax encodes exactly as diffusers tokenizes it, under either setting."""
    z = latents()
    a = ours(sd1, "a cute red narwhal", "blue square", z)
    b = ours(sd1, "a cute red narwhal", "blue square", z, prompt_syntax="plain")
    np.testing.assert_array_equal(a, b)
    theirs = sd1_reference(
        "a cute red narwhal",
        negative_prompt="blue square",
        num_inference_steps=STEPS,
        latents=torch.from_numpy(z.copy()),
        height=64,
        width=64,
        output_type="np",
    ).images[0]
    assert np.abs(a - theirs).max() <= TOL


def test_sdxl_weighted_prompt_matches_diffusers_fed_the_reference_embeds(sdxl_bundle, sdxl_folder):
    import diffusers

    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(sdxl_folder, add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    z = latents()

    def both(text):
        h1, _ = reference_embeds(ref.tokenizer, ref.text_encoder, text, -2)
        h2, pooled = reference_embeds(ref.tokenizer_2, ref.text_encoder_2, text, -2)
        return torch.cat([h1, h2], dim=-1), pooled

    cond, pooled = both(WEIGHTED)
    uncond, neg_pooled = both(NEGATIVE)
    theirs = ref(
        prompt_embeds=cond,
        pooled_prompt_embeds=pooled,
        negative_prompt_embeds=uncond,
        negative_pooled_prompt_embeds=neg_pooled,
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        latents=torch.from_numpy(z.copy()),
        height=64,
        width=64,
        output_type="np",
    ).images[0]
    xl = Pipeline.load(sdxl_bundle, backend="ort-cpu")
    mine = ours(xl, WEIGHTED, NEGATIVE, z, guidance_scale=5.0)
    assert np.abs(mine - theirs).max() <= TOL
    plain = ours(xl, WEIGHTED, NEGATIVE, z, guidance_scale=5.0, prompt_syntax="plain")
    assert np.abs(plain - theirs).max() > 5 * TOL


def test_a_bundle_of_one_chunk_keeps_the_first_75_tokens_and_says_what_it_drops(sd1, caplog):
    words = " ".join(f"w{i}" for i in range(60))  # each "wN" is at least two tokens
    tok = sd1.text_encoders[0].tokenizer
    (only,) = tok.chunks(words + ", (tail words:1.2)")
    assert len(only.tokens) == 75 and set(only.weights) == {1.0}
    with caplog.at_level(logging.WARNING, logger="diffrt.engine.prompts"):
        tok.chunks("a BREAK b")
    assert "dropped 1 tokens" in caplog.text


@pytest.mark.parametrize("bad", ["((((", "))))", "(:)", "(a:)", "[(]", "\\", "(a:1e400)", "BREAK BREAK", ":::"])
def test_odd_prompts_never_crash(sd1, bad):
    out = ours(sd1, bad, None, latents())
    assert np.isfinite(out).all()
