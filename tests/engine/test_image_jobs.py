"""Image to image and inpainting as a user meets them: `diffrt generate --image/--mask`, the Python API's
errors, PNG metadata, hostile image files, and bundles without a VAE encoder (schema 1 or re-exported)."""

import hashlib
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from diffrt import Pipeline
from diffrt.cli import main
from diffrt.errors import BadInput
from tests.builders.images import png_bomb, truncated_png
from tests.engine.test_pipeline_img2img import mask, picture


def generate(capsys, *args):
    code = main(["generate", *map(str, args)])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    picture(1).save(d / "init.png")
    mask().save(d / "mask.png")
    mask((32, 48)).save(d / "small-mask.png")
    (d / "bomb.png").write_bytes(png_bomb())
    (d / "cut.png").write_bytes(truncated_png())
    (d / "notes.txt").write_text("not an image")
    return d


@pytest.fixture(scope="module")
def pipe(sd1_bundle):
    return Pipeline.load(sd1_bundle, backend="ort-cpu")


def test_generate_image_to_image_matches_the_api_and_records_strength(capsys, sd1_bundle, files, pipe, tmp_path):
    out = tmp_path / "img2img.png"
    code, err = generate(capsys, sd1_bundle, "a fox", "--image", files / "init.png", "--strength", "0.5",
                         "--steps", "6", "--seed", "3", "-o", out)  # fmt: skip
    assert code == 0, err
    want = pipe("a fox", image=files / "init.png", strength=0.5, num_inference_steps=6, seed=3).images[0]
    got = Image.open(out)
    assert np.array_equal(np.asarray(got), np.asarray(want))
    fields = got.text["parameters"].splitlines()[-1]
    digest = hashlib.sha256((files / "init.png").read_bytes()).hexdigest()[:10]
    assert "Denoising strength: 0.5" in fields and f"Init image hash: {digest}" in fields
    assert "Steps: 6" in fields  # the requested steps, of which 3 run


def test_generate_inpainting_paste_back_keeps_the_unmasked_pixels(capsys, sd1_bundle, files, tmp_path):
    out = tmp_path / "inpaint.png"
    code, err = generate(capsys, sd1_bundle, "a fox", "--image", files / "init.png", "--mask", files / "mask.png",
                         "--paste-back", "--mask-blur", "0", "--steps", "4", "-o", out)  # fmt: skip
    assert code == 0, err
    got = np.asarray(Image.open(out), dtype=np.int16)
    init = np.asarray(picture(1), dtype=np.int16)
    keep = np.asarray(mask()) == 0
    assert np.abs(got[keep] - init[keep]).max() <= 1
    assert np.abs(got[~keep] - init[~keep]).mean() > 5  # the masked part was repainted
    assert "Mask blur: 0" in Image.open(out).text["parameters"]


BAD = [  # (extra arguments, words the one-line error must contain)
    (["--image", "{d}/cut.png"], ["image", "not a readable image"]),
    (["--image", "{d}/bomb.png"], ["image", "pixels", "smaller image"]),
    (["--image", "{d}/notes.txt"], ["image", "PNG, JPEG or WebP"]),
    (["--image", "{d}/missing.png"], ["image", "cannot read", "existing image file"]),
    (["--image", "{d}/init.png", "--mask", "{d}/bomb.png"], ["mask_image", "pixels"]),
    (["--mask", "{d}/mask.png"], ["mask_image needs image"]),
    (["--strength", "0.5"], ["strength", "image"]),
    (["--image", "{d}/init.png", "--strength", "0"], ["strength", "(0, 1]"]),
    (["--image", "{d}/init.png", "--strength", "1.5"], ["strength", "(0, 1]"]),
    (["--image", "{d}/init.png", "--strength", "0.05", "--steps", "10"], ["strength", "no step"]),
    (["--image", "{d}/init.png", "--paste-back"], ["paste_back", "mask_image"]),
    (["--image", "{d}/init.png", "--size", "60x64"], ["multiple of 8"]),
]


@pytest.mark.parametrize(("args", "words"), BAD)
def test_bad_image_jobs_exit_2_with_one_line_and_write_nothing(capsys, sd1_bundle, files, tmp_path, args, words):
    out = tmp_path / "o.png"
    code, err = generate(capsys, sd1_bundle, "a fox", "-o", out, *(a.format(d=files) for a in args))
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("diffrt: error: "), err
    for w in words:
        assert w in last, (w, last)
    assert not list(tmp_path.iterdir())


def test_api_errors_name_the_field(pipe, files):
    for kw, field in (
        (dict(image=(files / "cut.png").read_bytes()), "image"),
        (dict(image=png_bomb(9000)), "image"),
        (dict(image=picture(1), mask_image=b"junk"), "mask_image"),
        (dict(image=picture(1), strength=float("nan")), "strength"),
        (dict(image=np.zeros((8, 8, 5), np.float32)), "image"),
    ):
        with pytest.raises(BadInput) as e:
            pipe("x", num_inference_steps=3, **kw)
        assert e.value.field == field, (kw, e.value)


def _without_encoder(bundle, target, schema_1: bool):
    shutil.copytree(bundle, target)
    manifest = json.loads((target / "manifest.json").read_text())
    entry = manifest["components"].pop("vae_encoder")
    for graph in entry["files"].values() if isinstance(entry.get("files"), dict) else ():
        (target / graph).unlink(missing_ok=True)
    if schema_1:
        manifest["schema_version"] = 1
        manifest.pop("defaults", None)
        for c in manifest["components"].values():
            for role in ("cfg_batched", "per_step", "tiled"):
                c["spec"].pop(role, None)
            for t in c["spec"].get("inputs", ()):
                t.pop("steady", None)
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


@pytest.mark.parametrize("schema_1", [False, True], ids=["no-encoder", "schema-1"])
def test_bundles_without_an_encoder_draw_text_to_image_and_refuse_image_jobs(
    capsys, sd1_bundle, pipe, files, tmp_path, schema_1
):
    old = _without_encoder(sd1_bundle, tmp_path / "old.bundle", schema_1)
    kw = dict(num_inference_steps=3, seed=2, scheduler="euler")
    got = Pipeline.load(old, backend="ort-cpu")("a fox", **kw).images[0]
    assert np.array_equal(np.asarray(got), np.asarray(pipe("a fox", **kw).images[0]))
    out = tmp_path / "o.png"
    code, err = generate(capsys, old, "a fox", "--image", files / "init.png", "-o", out)
    assert code == 2 and "no VAE encoder" in err and "diffrt export" in err and not out.exists()
