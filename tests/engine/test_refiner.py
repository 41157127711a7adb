"""SDXL base -> refiner: the base runs the schedule up to refiner_at, the refiner the rest from the base's
latents (diffusers' denoising_end / denoising_start handoff), against diffusers' own two-pipeline recipe from
the same NumPy draws; then the CLI, metadata and the refusals."""

import numpy as np
import pytest
from PIL import Image

from diffrt import Pipeline
from diffrt.cli import main
from diffrt.errors import BadInput
from tests.engine.draws import inject_stream
from tests.engine.test_pipeline import DIFFUSERS

TOL = 1 / 255
COMMON = dict(prompt="a red fox", negative_prompt="blurry", num_inference_steps=7, guidance_scale=5.0)
SIZE = dict(height=64, width=64)
DRAWS = [
    "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl",
    "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img",
    "diffusers.schedulers.scheduling_euler_ancestral_discrete",
]


def inject(monkeypatch, seed: int) -> None:
    inject_stream(monkeypatch, seed, DRAWS)


@pytest.fixture(scope="module")
def reference(sdxl_folder, sdxl_refiner_folder):
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    base = StableDiffusionXLPipeline.from_pretrained(sdxl_folder, add_watermarker=False)
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(sdxl_refiner_folder, add_watermarker=False)
    for p in (base, refiner):
        p.set_progress_bar_config(disable=True)
    return base, refiner, dict(base.scheduler.config), dict(refiner.scheduler.config)


@pytest.fixture(scope="module")
def pipe(sdxl_bundle, sdxl_refiner_bundle):
    return Pipeline.load(sdxl_bundle, backend="ort-cpu", refiner=sdxl_refiner_bundle)


def theirs(reference, monkeypatch, sampler, at, seed=3):
    import diffusers

    base, refiner, base_config, refiner_config = reference
    cls_name, overrides = DIFFUSERS[sampler]
    base.scheduler = getattr(diffusers, cls_name).from_config(base_config, **overrides)
    refiner.scheduler = getattr(diffusers, cls_name).from_config(refiner_config, **overrides)
    inject(monkeypatch, seed)
    latents = base(**COMMON, **SIZE, denoising_end=at, output_type="latent").images
    return np.asarray(refiner(**COMMON, image=latents, denoising_start=at, output_type="np").images)


def mine(pipe, sampler, at, seed=3):
    out = pipe(**COMMON, **SIZE, scheduler=sampler, refiner_at=at, seed=seed, upscale=False, output_type="np")
    return np.stack(out.images)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "ddim", "euler_a"])
def test_base_to_refiner_matches_diffusers(reference, pipe, monkeypatch, sampler):
    want, got = theirs(reference, monkeypatch, sampler, 0.8), mine(pipe, sampler, 0.8)
    err = float(np.abs(got - want).max())
    print(f"refiner {sampler}: max abs error {err:.2e}")
    assert got.shape == want.shape and err <= TOL


def test_handoff_point_and_tolerance(reference, pipe, monkeypatch, sdxl_bundle):
    """Another switch point matches diffusers too; the base alone, or another switch point, is far off."""
    assert np.abs(mine(pipe, "euler", 0.6) - theirs(reference, monkeypatch, "euler", 0.6)).max() <= TOL
    base_alone = Pipeline.load(sdxl_bundle, backend="ort-cpu")
    alone = np.stack(base_alone(**COMMON, **SIZE, scheduler="euler", seed=3, output_type="np").images)
    both = mine(pipe, "euler", 0.8)
    assert np.abs(alone - both).max() > 5 * TOL and np.abs(mine(pipe, "euler", 0.6) - both).max() > 5 * TOL


def test_generate_with_a_refiner_records_it(capsys, sdxl_bundle, sdxl_refiner_bundle, pipe, tmp_path):
    out = tmp_path / "r.png"
    code = main(["generate", str(sdxl_bundle), "a red fox", "--refiner", str(sdxl_refiner_bundle),
                 "--refiner-at", "0.7", "--steps", "6", "--size", "64x64", "-o", str(out)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    im = Image.open(out)
    assert "Refiner switch at: 0.7" in im.text["parameters"]
    want = pipe("a red fox", refiner_at=0.7, num_inference_steps=6, **SIZE).images[0]
    assert np.array_equal(np.asarray(im), np.asarray(want))


def test_refusals_name_the_problem(capsys, sd1_bundle, sdxl_bundle, sdxl_refiner_bundle, pipe, tmp_path):
    with pytest.raises(BadInput, match="SDXL base.*sd1"):
        Pipeline.load(sd1_bundle, backend="ort-cpu", refiner=sdxl_refiner_bundle)
    with pytest.raises(BadInput, match="refiner .* is sd1"):
        Pipeline.load(sdxl_bundle, backend="ort-cpu", refiner=sd1_bundle)
    cases = [
        (dict(scheduler="heun"), "cannot hand over"),
        (dict(refiner_at=1.0), r"refiner_at must be a number in \(0, 1\)"),
        (dict(refiner_at=0.999, scheduler="euler", num_inference_steps=4), "no step"),
        (dict(image=np.zeros((64, 64, 3), np.float32)), "text to image only"),
    ]
    for kw, words in cases:
        with pytest.raises(BadInput, match=words) as e:
            pipe("x", **{"num_inference_steps": 5, **kw})
        assert e.value.field == "refiner_at", kw
    with pytest.raises(BadInput, match="needs a refiner"):
        Pipeline.load(sdxl_bundle, backend="ort-cpu")("x", refiner_at=0.8, num_inference_steps=2)
    out = tmp_path / "o.png"
    code = main(["generate", str(sd1_bundle), "x", "--refiner", str(sdxl_refiner_bundle), "-o", str(out)])
    assert code == 2 and "SDXL base" in capsys.readouterr().err and not out.exists()
