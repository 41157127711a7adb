"""A1111's hires fix: a second image-to-image pass at scale x the size over the first pass.

Latent upscalers are checked against the same composition written with diffusers (StableDiffusionPipeline to
latents, torch's interpolate, StableDiffusionImg2ImgPipeline on the latents) from the same NumPy draws; the
ESRGAN upscaler against the same composition written with diffrt's own public calls; then the CLI, the
service fields, PNG metadata and the refusals.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from diffrt import Pipeline
from diffrt.cli import main
from diffrt.engine.hires import HiresOptions, resize_latents
from diffrt.errors import BadInput
from tests.engine.draws import inject_stream
from tests.engine.test_pipeline import DIFFUSERS, NEGATIVE, PROMPT

TOL = 1 / 255
FIRST = dict(height=32, width=48)  # -> 64x96 at 2x
COMMON = dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=6, guidance_scale=6.0)
DRAWS = [  # where diffusers' text-to-image, image-to-image and schedulers draw their noise
    "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion",
    "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img",
    "diffusers.schedulers.scheduling_euler_ancestral_discrete",
]


def inject(monkeypatch, seed: int) -> None:
    inject_stream(monkeypatch, seed, DRAWS)


@pytest.fixture(scope="module")
def reference(sd1_folder):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    txt = StableDiffusionPipeline.from_pretrained(sd1_folder, safety_checker=None)
    txt.set_progress_bar_config(disable=True)
    img = StableDiffusionImg2ImgPipeline(**txt.components)
    img.set_progress_bar_config(disable=True)
    return txt, img, dict(txt.scheduler.config)


@pytest.fixture(scope="module")
def pipe(sd1_bundle):
    return Pipeline.load(sd1_bundle, backend="ort-cpu")


def theirs(reference, monkeypatch, sampler, mode, strength, seed=4, steps=None):
    """diffusers: first pass to latents, torch's interpolation, image to image on the latents; the second pass
    draws from the same seed again."""
    import diffusers

    txt, img, config = reference
    cls_name, overrides = DIFFUSERS[sampler]
    txt.scheduler = img.scheduler = getattr(diffusers, cls_name).from_config(config, **overrides)
    inject(monkeypatch, seed)
    latents = txt(**COMMON, **FIRST, output_type="latent").images
    size = (2 * FIRST["height"] // 8, 2 * FIRST["width"] // 8)
    if mode == "latent-nearest":
        up = torch.nn.functional.interpolate(latents, size=size, mode="nearest")
    else:
        kind = "bicubic" if mode == "latent-bicubic" else "bilinear"
        up = torch.nn.functional.interpolate(latents, size=size, mode=kind, align_corners=False, antialias=False)
    inject(monkeypatch, seed)
    second = {**COMMON, "num_inference_steps": steps or COMMON["num_inference_steps"]}
    return np.asarray(img(**second, image=up, strength=strength, output_type="np").images)


def mine(pipe, sampler, mode, strength, seed=4, steps=None):
    hires = HiresOptions(scale=2, upscaler=mode, strength=strength, steps=steps)
    out = pipe(**COMMON, **FIRST, scheduler=sampler, seed=seed, hires=hires, upscale=False, output_type="np")
    return np.stack(out.images)


@pytest.mark.parametrize("mode", ["latent", "latent-bicubic", "latent-nearest"])
@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "ddim"])
def test_latent_hires_matches_the_diffusers_composition(reference, pipe, monkeypatch, sampler, mode):
    want = theirs(reference, monkeypatch, sampler, mode, 0.7)
    got = mine(pipe, sampler, mode, 0.7)
    assert got.shape == want.shape == (1, 64, 96, 3)
    err = float(np.abs(got - want).max())
    print(f"hires {mode} {sampler}: max abs error {err:.2e}")
    assert err <= TOL


def test_hires_steps_and_the_tolerance_separates_settings(reference, pipe, monkeypatch):
    """hires.steps changes the second pass as diffusers' num_inference_steps does; the tolerance is far below
    what another upscaler, strength or seed changes."""
    assert np.abs(mine(pipe, "euler", "latent", 0.5, steps=4) - theirs(reference, monkeypatch, "euler", "latent",
                  0.5, steps=4)).max() <= TOL  # fmt: skip
    base = mine(pipe, "euler", "latent", 0.7)
    for other in (mine(pipe, "euler", "latent-nearest", 0.7), mine(pipe, "euler", "latent", 0.5),
                  mine(pipe, "euler", "latent", 0.7, seed=5)):  # fmt: skip
        assert np.abs(base - other).max() > 5 * TOL


def test_resize_latents_is_torch_interpolate():
    x = np.random.default_rng(0).standard_normal((2, 4, 5, 7), dtype=np.float32)
    t = torch.from_numpy(x)
    for size in ((10, 14), (11, 9), (5, 7), (3, 4)):
        bilinear = torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False).numpy()
        bicubic = torch.nn.functional.interpolate(t, size=size, mode="bicubic", align_corners=False).numpy()
        nearest = torch.nn.functional.interpolate(t, size=size, mode="nearest").numpy()
        np.testing.assert_allclose(resize_latents(x, *size, "latent"), bilinear, atol=1e-6)
        np.testing.assert_allclose(resize_latents(x, *size, "latent-bicubic"), bicubic, atol=1e-5)
        np.testing.assert_array_equal(resize_latents(x, *size, "latent-nearest"), nearest)


def test_esrgan_hires_is_decode_upscale_resize_then_image_to_image(sd1_upscaled_bundle):
    """The ESRGAN path equals the composition written with public calls: the first pass decoded and upscaled
    by the bundle's upscaler (8-bit, as saved), then image to image at the target size from the same seed."""
    pipe = Pipeline.load(sd1_upscaled_bundle, backend="ort-cpu")
    kw = dict(COMMON, scheduler="dpmpp_2m", seed=8)
    hires = HiresOptions(scale=2, upscaler="esrgan", strength=0.6)
    got = pipe(**kw, **FIRST, hires=hires, upscale=False, output_type="np").images[0]
    first = pipe(**kw, **FIRST, upscale=True).images[0]  # 4x: 192x128
    assert first.size == (192, 128)
    want = pipe(**kw, image=first, strength=0.6, height=64, width=96, upscale=False, output_type="np").images[0]
    assert got.shape == (64, 96, 3)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_per_image_seeds_hold_across_both_passes(pipe):
    kw = dict(COMMON, **FIRST, scheduler="euler_a", hires=HiresOptions(), output_type="np")
    both = pipe(**kw, seed=11, num_images=2).images
    for i in range(2):
        np.testing.assert_allclose(both[i], pipe(**kw, seed=11 + i).images[0], atol=1e-5)


def test_generate_hires_writes_the_target_size_and_a1111_metadata(capsys, sd1_bundle, pipe, tmp_path):
    out = tmp_path / "h.png"
    code = main(["generate", str(sd1_bundle), PROMPT, "--size", "48x32", "--steps", "6", "--seed", "2",
                 "--hires", "2", "--hires-strength", "0.5", "-o", str(out)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    im = Image.open(out)
    assert im.size == (96, 64)
    fields = im.text["parameters"].splitlines()[-1]
    assert "Size: 48x32" in fields and "Hires upscale: 2, Hires upscaler: Latent, Denoising strength: 0.5" in fields
    want = pipe(PROMPT, **FIRST, num_inference_steps=6, seed=2, hires=HiresOptions(strength=0.5)).images[0]
    assert np.array_equal(np.asarray(im), np.asarray(want))


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--hires", "4"], ["hires target 256x256", "range [32, 128]", "--image-range"]),
        (["--hires", "2", "--hires-upscaler", "esrgan"], ["esrgan", "--upscaler"]),
        (["--hires", "2", "--hires-upscaler", "lanczos"], ["unknown", "latent-nearest"]),
        (["--hires", "0.5"], ["hires.scale", "[1, 4]"]),
        (["--hires-strength", "0.5"], ["needs --hires"]),
        (["--hires", "2", "--hires-strength", "0.05", "--steps", "10"], ["hires", "no step"]),
    ],
)
def test_bad_hires_requests_exit_2_with_one_line(capsys, sd1_bundle, tmp_path, args, words):
    out = tmp_path / "o.png"
    code = main(["generate", str(sd1_bundle), PROMPT, "-o", str(out), *args])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("diffrt: error: ")
    for w in words:
        assert w in last, (w, last)
    assert not list(tmp_path.iterdir())


def test_hires_with_an_image_job_is_refused(pipe):
    with pytest.raises(BadInput, match="text to image") as e:
        pipe(PROMPT, image=np.zeros((64, 64, 3), np.float32), hires=HiresOptions())
    assert e.value.field == "hires"
