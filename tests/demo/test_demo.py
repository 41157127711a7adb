"""The built-in demo: the committed checkpoint exports to a bundle that draws what the prompt asks, as diffusers
does on the same checkpoint from the same start; `diffrt generate demo` writes the upscaled picture."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from diffrt.demo import CHECKPOINT, DEMO_DEFAULTS, demo_bundle
from diffrt.demo.accuracy import format_summary, run_suite, summary
from diffrt.demo.reference import diffrt_generator, diffusers_generator
from diffrt.demo.scenes import analyse

pytestmark = pytest.mark.skipif(not (CHECKPOINT / "model_index.json").exists(), reason="demo checkpoint not built")
# what `generate demo` uses
SETTINGS = (DEMO_DEFAULTS["scheduler"], DEMO_DEFAULTS["num_inference_steps"], DEMO_DEFAULTS["guidance_scale"])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh cache: the first demo_bundle() call exports and validates the checkpoint and upscaler."""
    root = tmp_path_factory.mktemp("cache")
    old = os.environ.get("DIFFRT_CACHE")
    os.environ["DIFFRT_CACHE"] = str(root)
    yield root
    os.environ.pop("DIFFRT_CACHE") if old is None else os.environ.__setitem__("DIFFRT_CACHE", old)


@pytest.fixture(scope="module")
def bundle(cache):
    path = demo_bundle()
    assert path.parent == cache and demo_bundle() == path  # built once, then found
    return path


@pytest.fixture(scope="module")
def suites(bundle):
    return {
        "diffrt": run_suite(diffrt_generator(bundle, *SETTINGS)),
        "diffusers": run_suite(diffusers_generator(CHECKPOINT, *SETTINGS)),
    }


def test_demo_model_draws_the_colours_asked_for(suites):
    s = summary(suites["diffrt"])
    print(format_summary("diffrt", s))
    assert s["background"] >= 0.9 and s["colour"] >= 0.9
    assert s["unseen_colour"] >= 0.85  # (colour, shape, background) triples never seen in training


def test_diffusers_scores_the_same_on_the_same_checkpoint(suites):
    ours, ref = suites["diffrt"], suites["diffusers"]
    print(format_summary("diffusers", summary(ref)))
    same = [(a.reading.background, a.reading.colour) == (b.reading.background, b.reading.colour)
            for a, b in zip(ours, ref)]  # fmt: skip
    assert np.mean(same) >= 0.97
    for key in ("background", "colour", "position"):
        assert abs(summary(ours)[key] - summary(ref)[key]) <= 2 / len(ours)


def test_side_named_in_the_prompt_is_measured(suites):
    s = summary(suites["diffrt"])
    print(f"side right: {s['position']:.1%} (target 80 %)")
    assert s["position"] >= 0.8  # the target; chance is about a third


def test_generate_demo_writes_the_upscaled_picture(bundle, tmp_path):
    out = tmp_path / "demo.png"
    prompt = "a large yellow square on a black background"
    done = subprocess.run(
        [sys.executable, "-m", "diffrt.cli", "generate", "demo", prompt, "-o", str(out)],
        capture_output=True, text=True, env=os.environ.copy(), timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    image = Image.open(out)
    assert image.size == (256, 256) and prompt in image.info["parameters"]
    assert "Steps: 20" in image.info["parameters"] and "CFG scale: 2" in image.info["parameters"]
    reading = analyse(np.asarray(image.convert("RGB")))
    assert (reading.background, reading.colour) == ("black", "yellow")
