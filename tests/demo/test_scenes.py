"""The scene world: deterministic captioned scenes that say what they show, and an analyser that reads them."""

import numpy as np
import pytest

from diffrt.demo import scenes as S


def test_batches_are_deterministic_and_differ_by_seed():
    caps_a, imgs_a = S.batch(3, 16)
    caps_b, imgs_b = S.batch(3, 16)
    assert caps_a == caps_b and np.array_equal(imgs_a, imgs_b)
    caps_c, imgs_c = S.batch(4, 16)
    assert caps_a != caps_c and not np.array_equal(imgs_a, imgs_c)
    assert imgs_a.shape == (16, 64, 64, 3) and imgs_a.dtype == np.uint8


def test_scenes_use_the_exact_css_colours():
    rng = np.random.default_rng(0)
    scene = S.Scene("orange", "square", "purple", "large", "left")
    img = S.draw(scene, rng)
    colours, counts = np.unique(img.reshape(-1, 3), axis=0, return_counts=True)
    top2 = {tuple(int(v) for v in c) for c in colours[np.argsort(counts)[-2:]]}
    assert top2 == {(255, 165, 0), (128, 0, 128)}
    x = np.nonzero((img == (255, 165, 0)).all(-1))[1]
    assert x.mean() < 24  # drawn on the left


def test_captions_say_what_the_scene_shows_in_words_the_tokenizer_knows():
    rng = np.random.default_rng(1)
    for _ in range(300):
        scene = S.random_scene(rng)
        caption = scene.caption(rng)
        words = caption.replace(",", " ").split()
        assert set(words) <= set(S.WORDS), caption
        assert scene.colour in words and scene.shape in words and scene.background in words
        assert words.index(scene.colour) != words.index(scene.background)
        if scene.size:
            assert {"small": {"small", "little"}, "large": {"large", "big"}}[scene.size] & set(words), caption


def test_demo_tokenizer_gives_every_word_one_token(tmp_path):
    from transformers import CLIPTokenizerFast

    from diffrt.export.tokenizer import word_bpe_files

    word_bpe_files(tmp_path, S.WORDS, "<|endoftext|>", 24)
    tok = CLIPTokenizerFast.from_pretrained(tmp_path)
    assert tok.model_max_length == 24
    for word in S.WORDS:
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    longest = max((S.random_scene(np.random.default_rng(i)).caption() for i in range(200)), key=len)
    assert len(tok(longest).input_ids) <= 24


def test_held_out_triples_never_reach_training_but_are_in_the_suite():
    rng = np.random.default_rng(2)
    seen = {(s.colour, s.shape, s.background) for s in (S.random_scene(rng) for _ in range(3000))}
    assert not any(S.held_out(*t) for t in seen)
    suite = S.prompt_suite()
    unseen = [s for s in suite if S.held_out(s.colour, s.shape, s.background)]
    assert len(unseen) >= 10 and len(suite) - len(unseen) >= 10
    assert {s.position for s in suite} >= {"left", "right", "top", "bottom", "centre"}
    assert {s.background for s in suite} == set(S.COLOURS) and {s.shape for s in suite} == set(S.SHAPES)


@pytest.mark.parametrize("upscale", [1, 4])
def test_analyser_reads_drawn_scenes(upscale):
    rng = np.random.default_rng(5)
    named = right = shapes = 0
    for _ in range(200):
        scene = S.random_scene(rng, training=False)
        img = S.draw(scene, rng)
        if upscale > 1:  # as the upscaler's output: 4x the pixels, smooth edges
            img = np.kron(img, np.ones((upscale, upscale, 1), np.uint8))
        r = S.analyse(img)
        assert (r.background, r.colour) == (scene.background, scene.colour)
        shapes += r.shape == scene.shape
        if scene.position:
            named += 1
            right += r.position_matches(scene.position)
    assert right == named and shapes >= 190


def test_analyser_finds_no_object_on_a_plain_picture_and_the_wrong_side_is_wrong():
    plain = np.full((64, 64, 3), S.COLOURS["green"], np.uint8)
    r = S.analyse(plain)
    assert r.background == "green" and r.colour is None and not r.position_matches("left")
    img = S.draw(S.Scene("white", "circle", "black", "small", "right"), np.random.default_rng(0))
    r = S.analyse(img)
    assert r.position_matches("right") and not r.position_matches("left") and not r.position_matches("centre")
