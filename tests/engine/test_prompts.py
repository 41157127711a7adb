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


def reference_chunks(tokenizer, text: str) -> list[tuple[list[int], list[float]]]:
    """A1111's chunking, token by token: 75 per chunk; when a chunk is full and the next token is not a comma,
    everything after the chunk's last comma moves on to the next chunk if that comma is at most 20 back."""
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    chunks: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1
    for part, w in reference_parse(text):
        for token in tokenizer(part, add_special_tokens=False).input_ids:
            if token == comma:
                last_comma = len(ids)
            elif len(ids) == 75 and last_comma != -1 and 75 - last_comma <= 20:
                cut = last_comma + 1
                chunks.append((ids[:cut], weights[:cut]))
                ids, weights, last_comma = ids[cut:], weights[cut:], -1
            if len(ids) == 75:
                chunks.append((ids, weights))
                ids, weights, last_comma = [], [], -1
            ids.append(token)
            weights.append(w)
    if ids or not chunks:
        chunks.append((ids, weights))
    return chunks


def reference_embeds(tokenizer, encoder, text: str, hidden_layer: int | None, windows: int = 1):
    """(1, 77 k, D) weighted hidden states and the (1, P) pooled output of the first chunk, as A1111 computes
    them: each chunk encoded on its own, weighted, its mean restored; at most `windows` chunks (one: the first
    75 tokens, as diffusers truncates), fewer padded with empty chunks to `windows`."""
    if windows > 1:
        chunks = reference_chunks(tokenizer, text)
    else:  # no comma backtrack when one chunk is all there is
        ids, weights = [], []
        for part, w in reference_parse(text):
            part_ids = tokenizer(part, add_special_tokens=False).input_ids
            ids += part_ids
            weights += [w] * len(part_ids)
        chunks = [(ids[:75], weights[:75])]
    chunks = (chunks + [([], [])] * windows)[:windows]
    n = tokenizer.model_max_length
    states, pooled = [], None
    for ids, weights in chunks:
        row = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
        row += [tokenizer.pad_token_id] * (n - len(row))
        w = torch.tensor([1.0, *weights] + [1.0] * (n - len(weights) - 1))
        with torch.no_grad():
            out = encoder(torch.tensor([row]), output_hidden_states=hidden_layer is not None)
        z = out.last_hidden_state if hidden_layer is None else out.hidden_states[hidden_layer]
        mean = z.mean()
        z = z * w[None, :, None]
        states.append(z * (mean / z.mean()))
        if pooled is None:
            pooled = getattr(out, "text_embeds", None)
    return torch.cat(states, dim=1), pooled


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


# About 200 tokens with commas every few words, so that chunks end by A1111's comma backtrack, and weights in
# every chunk: what people paste from model pages
LONG = ", ".join(f"w{i} {'(cute:1.3)' if i % 5 == 0 else 'red'} narwhal" for i in range(35)) + ", [blue] photo"


def test_long_prompts_chunk_as_a1111_chunks(sd1, sd1_reference):
    mine = sd1.text_encoders[0].tokenizer.chunks(LONG, 3)
    ref = reference_chunks(sd1_reference.tokenizer, LONG)
    assert len(ref) == 3 and sum(len(ids) for ids, _ in ref) >= 195
    assert len(ref[0][0]) < 75  # the first chunk ended at a comma
    assert [list(c.tokens) for c in mine] == [ids for ids, _ in ref]
    for c, (_, weights) in zip(mine, ref):
        np.testing.assert_allclose(c.weights, weights, rtol=1e-12)


def test_sd1_long_prompt_keeps_its_tail_and_matches_diffusers_fed_the_reference(sd1, sd1_reference):
    """All three chunks reach the UNet (77 x 3 tokens), the one-chunk negative padded with empty chunks."""
    ref = sd1_reference
    z = latents()

    def theirs(windows):
        cond, _ = reference_embeds(ref.tokenizer, ref.text_encoder, LONG, None, windows)
        uncond, _ = reference_embeds(ref.tokenizer, ref.text_encoder, NEGATIVE, None, windows)
        return ref(
            prompt_embeds=cond,
            negative_prompt_embeds=uncond,
            num_inference_steps=STEPS,
            latents=torch.from_numpy(z.copy()),
            height=64,
            width=64,
            output_type="np",
        ).images[0]

    assert sd1.max_chunks == 3
    mine = ours(sd1, LONG, NEGATIVE, z)
    assert np.abs(mine - theirs(3)).max() <= TOL
    assert np.abs(mine - theirs(1)).max() > 5 * TOL  # what truncating at 75 tokens draws
    assert np.abs(mine - theirs(2)).max() > 2 * TOL  # the last chunk counts too


def test_sdxl_long_prompt_matches_diffusers_fed_the_reference(sdxl_bundle, sdxl_folder):
    """Both encoders chunk alike; the pooled projection is the first chunk's (A1111)."""
    import diffusers

    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(sdxl_folder, add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    z = latents()

    def both(text, windows):
        h1, _ = reference_embeds(ref.tokenizer, ref.text_encoder, text, -2, windows)
        h2, pooled = reference_embeds(ref.tokenizer_2, ref.text_encoder_2, text, -2, windows)
        return torch.cat([h1, h2], dim=-1), pooled

    def theirs(windows):
        cond, pooled = both(LONG, windows)
        uncond, neg_pooled = both(NEGATIVE, windows)
        return ref(
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
    mine = ours(xl, LONG, NEGATIVE, z, guidance_scale=5.0)
    assert np.abs(mine - theirs(3)).max() <= TOL
    assert np.abs(mine - theirs(1)).max() > 5 * TOL


def test_prompts_past_the_bundles_chunks_keep_the_first_ones_and_say_so(sd1, caplog):
    tok = sd1.text_encoders[0].tokenizer
    with caplog.at_level(logging.WARNING, logger="diffrt.engine.prompts"):
        kept = tok.chunks(LONG + ", " + LONG, 3)
    assert len(kept) == 3 and "this bundle takes 3" in caplog.text
    caplog.clear()
    assert tok.chunks(LONG + ", " + LONG, 3, quiet=True) == kept and not caplog.text


def test_bundles_from_before_long_prompts_take_one_chunk(sd1):
    """A manifest whose UNet sequence is a fixed 77 (no text_chunks dim) reads as one chunk."""
    from diffrt.specs import ComponentSpec

    d = sd1.manifest.components["unet"].spec.to_dict()
    d["dims"] = [dim for dim in d["dims"] if dim[0] != "text_chunks"]
    d["derived"] = []
    for t in d["inputs"]:
        t["shape"] = [77 if x == "sequence" else x for x in t["shape"]]
    old = ComponentSpec.from_dict(d)
    dims = {"batch": 2, "latent_height": 8, "latent_width": 8}
    shapes = {t.name: old.shape(t, dims) for t in old.inputs}
    assert old.max_chunks == 1 and old.dims_of(shapes) == dims and shapes["encoder_hidden_states"][1] == 77


# --- clip skip -------------------------------------------------------------------------------------------------


def test_sd1_clip_skip_matches_diffusers_clip_skip(sd1, sd1_reference):
    """A1111's Clip skip 2 is diffusers' clip_skip=1: the penultimate layer, through the final layer norm. A1111
    skips for the negative prompt too, diffusers' pipeline only for the prompt: the reference encodes both with
    diffusers' own encode_prompt(clip_skip=...)."""
    ref, z = sd1_reference, latents()
    # diffusers' SD clip_skip reads text_encoder.text_model.final_layer_norm; transformers 5's CLIPTextModel holds
    # the norm itself. A plain attribute (not a submodule) gives diffusers the path it expects.
    if not hasattr(ref.text_encoder, "text_model"):
        object.__setattr__(ref.text_encoder, "text_model", ref.text_encoder)

    def embeds(text, skip):
        return ref.encode_prompt(text, "cpu", 1, False, clip_skip=skip)[0]

    for a1111 in (2, 4):  # 4: the token embeddings themselves, on this three-layer encoder
        theirs = ref(
            prompt_embeds=embeds("a cute red narwhal", a1111 - 1),
            negative_prompt_embeds=embeds("blue square", a1111 - 1),
            num_inference_steps=STEPS,
            latents=torch.from_numpy(z.copy()),
            height=64,
            width=64,
            output_type="np",
        ).images[0]
        mine = ours(sd1, "a cute red narwhal", "blue square", z, clip_skip=a1111)
        assert np.abs(mine - theirs).max() <= TOL
    usual = ours(sd1, "a cute red narwhal", "blue square", z, clip_skip=1)
    assert np.abs(usual - mine).max() > 5 * TOL
    np.testing.assert_array_equal(usual, ours(sd1, "a cute red narwhal", "blue square", z))  # 1 is the default


def test_sdxl_clip_skip_matches_diffusers_clip_skip(sdxl_bundle, sdxl_folder):
    """Both encoders skip alike (diffusers: hidden_states[-(clip_skip + 2)], no final norm); pooled unchanged."""
    import diffusers

    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(sdxl_folder, add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    z = latents()
    cond, _, pooled, _ = ref.encode_prompt("a cute red narwhal", do_classifier_free_guidance=False, clip_skip=1)
    uncond, _, neg_pooled, _ = ref.encode_prompt("blue square", do_classifier_free_guidance=False, clip_skip=1)
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
    mine = ours(xl, "a cute red narwhal", "blue square", z, guidance_scale=5.0, clip_skip=2)
    assert np.abs(mine - theirs).max() <= TOL
    usual = ours(xl, "a cute red narwhal", "blue square", z, guidance_scale=5.0)
    assert np.abs(usual - theirs).max() > 5 * TOL


def test_clip_skip_past_the_encoder_is_refused_by_name(sd1):
    from diffrt.errors import BadInput

    for bad in (0, 5, 2.0, True):
        with pytest.raises(BadInput) as e:
            ours(sd1, "a cat", None, latents(), clip_skip=bad)
        assert e.value.field == "clip_skip", bad
    assert "use 1 to 4" in str(pytest.raises(BadInput, ours, sd1, "a cat", None, latents(), clip_skip=5).value)


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
