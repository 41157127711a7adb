"""`diffrt generate` and the Python API as a user meets them: PNGs, metadata, bad input, no torch."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from diffrt import Pipeline
from diffrt.cli import main
from diffrt.errors import BadInput, NonFiniteOutput


def generate(capsys, *args):
    code = main(["generate", *map(str, args)])
    return code, capsys.readouterr().err


def test_generate_writes_png_with_a1111_parameters(capsys, sd1_bundle, tmp_path):
    out = tmp_path / "img.png"
    code, err = generate(
        capsys,
        sd1_bundle,
        "a red circle",
        "-o",
        out,
        "--steps",
        "3",
        "--seed",
        "4",
        "--negative",
        "blue",
        "--scheduler",
        "DPM++ 2M Karras",
        "--backend",
        "ort-cpu",
        "--clip-skip",
        "2",
    )
    assert code == 0, err
    image = Image.open(out)
    assert image.size == (64, 64)
    text = image.text["parameters"]
    first, negative, fields = text.split("\n")
    assert first == "a red circle" and negative == "Negative prompt: blue"
    assert "Steps: 3" in fields and "Sampler: DPM++ 2M Karras" in fields and "Seed: 4" in fields
    assert "Size: 64x64" in fields and "CFG scale: 7.5" in fields and "Clip skip: 2" in fields
    assert "unet" in err and "ms" in err  # per-stage timings on stderr


def test_same_seed_gives_identical_png_bytes(capsys, sd1_bundle, tmp_path):
    paths = [tmp_path / f"{i}.png" for i in range(3)]
    for path, seed in zip(paths, (5, 5, 6)):
        assert generate(capsys, sd1_bundle, "a cat", "-o", path, "--steps", "2", "--seed", seed)[0] == 0
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert np.asarray(Image.open(paths[0])).tolist() != np.asarray(Image.open(paths[2])).tolist()


def test_num_images_writes_numbered_files(capsys, sd1_bundle, tmp_path):
    code, _ = generate(
        capsys, sd1_bundle, "a cat", "-o", tmp_path / "x.png", "--steps", "2", "--num-images", "2", "--size", "32x64"
    )
    assert code == 0
    for i in range(2):
        assert Image.open(tmp_path / f"x-{i}.png").size == (32, 64)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--scheduler", "warp_drive"], ["unknown", "euler_a", "dpmpp_2m_karras"]),
        (["--size", "60x64"], ["multiple of 8"]),
        (["--size", "64x1024"], ["outside"]),
        (["--size", "40x64"], ["multiple of 16"]),
        (["--steps", "0"], ["num_inference_steps"]),
        (["--guidance", "nan"], ["guidance_scale"]),
        (["--num-images", "0"], ["num_images"]),
        (["--backend", "warp"], ["unknown backend"]),
        (["--prompt-2", "a dog"], ["SDXL", "sd1"]),
        (["--original-size", "512,512"], ["SDXL"]),
        (["--clip-skip", "9"], ["clip_skip=9", "1 to 4"]),
    ],
)
def test_bad_generate_arguments_exit_2_with_one_line(capsys, sd1_bundle, tmp_path, args, words):
    out = tmp_path / "o.png"
    code, err = generate(capsys, sd1_bundle, "a cat", "-o", out, *args)
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("diffrt: error: ")
    for w in words:
        assert w in last, (w, last)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_sdxl_conditioning_options_reach_the_pipeline(capsys, sdxl_bundle, tmp_path):
    """--prompt-2 and the size conditions change the SDXL picture as the same Pipeline call does."""
    base = ["a red circle", "--steps", "3", "--size", "64x64"]
    code, err = generate(capsys, sdxl_bundle, *base, "-o", tmp_path / "a.png")
    assert code == 0, err
    code, err = generate(capsys, sdxl_bundle, *base, "-o", tmp_path / "b.png", "--prompt-2", "a blue square",
                         "--original-size", "32,48", "--crops-coords-top-left", "8,0")  # fmt: skip
    assert code == 0, err
    pipe = Pipeline.load(sdxl_bundle, backend="ort-cpu")
    want = pipe("a red circle", num_inference_steps=3, height=64, width=64, prompt_2="a blue square",
                original_size=(32, 48), crops_coords_top_left=(8, 0), upscale=False).images[0]  # fmt: skip
    a, b = (np.asarray(Image.open(tmp_path / n)) for n in ("a.png", "b.png"))
    assert not np.array_equal(a, b) and np.array_equal(b, np.asarray(want))


def test_bad_latents_are_refused(sd1_bundle):
    pipe = Pipeline.load(sd1_bundle, backend="ort-cpu")
    with pytest.raises(BadInput, match="shape"):
        pipe("x", latents=np.zeros((1, 4, 4, 4), np.float32), height=64, width=64)
    with pytest.raises(BadInput, match="float32"):
        pipe("x", latents=np.zeros((1, 4, 8, 8), np.float64), height=64, width=64)


def test_missing_corrupt_and_newer_bundles(capsys, sd1_bundle, tmp_path):
    code, err = generate(capsys, tmp_path / "nothing", "x")
    assert code == 2 and "does not exist" in err
    corrupt = tmp_path / "corrupt"
    shutil.copytree(sd1_bundle, corrupt)
    (corrupt / "manifest.json").write_text("{")
    code, err = generate(capsys, corrupt, "x")
    assert code == 2 and "corrupt" in err
    newer = tmp_path / "newer"
    shutil.copytree(sd1_bundle, newer)
    manifest = json.loads((newer / "manifest.json").read_text())
    (newer / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 99}))
    code, err = generate(capsys, newer, "x")
    assert code == 2 and "upgrade diffrt" in err
    missing_graph = tmp_path / "missing"
    shutil.copytree(sd1_bundle, missing_graph)
    (missing_graph / "onnx/unet.fp32.onnx").unlink()
    code, err = generate(capsys, missing_graph, "x")
    assert code == 2 and "unet" in err and "missing" in err


def test_long_prompt_is_truncated_with_a_warning(sd1_bundle, caplog):
    pipe = Pipeline.load(sd1_bundle, backend="ort-cpu")
    from tokenizers import Tokenizer

    words = "red blue green cat " * 30
    full = Tokenizer.from_file(str(sd1_bundle / "tokenizer/tokenizer.json")).encode(words).ids
    assert len(full) > 77
    ids = pipe.text_encoders[0].tokenizer([words])
    assert ids.shape == (1, 77) and ids[0, -1] == pipe.manifest.tokenizer.eos_id
    assert ids[0, :76].tolist() == full[:76]
    assert any(f"{len(full) - 77} tokens over" in r.getMessage() for r in caplog.records)


def test_non_finite_vae_output_names_the_component(sd1_folder, tmp_path, capsys):
    """A VAE that makes NaN (exported without validation) must fail loudly, never save a black image."""
    import torch
    from diffusers import AutoencoderKL

    broken = tmp_path / "ckpt"
    shutil.copytree(sd1_folder, broken)
    vae = AutoencoderKL.from_pretrained(broken / "vae")
    with torch.no_grad():
        vae.decoder.conv_out.bias[0] = float("nan")
    vae.save_pretrained(broken / "vae")
    assert main(["export", str(broken), "-o", str(tmp_path / "b"), "--no-validate"]) == 0
    out = tmp_path / "o.png"
    code, err = generate(capsys, tmp_path / "b", "x", "-o", out, "--steps", "2")
    assert code == 2 and "vae_decoder" in err.strip().splitlines()[-1]
    assert not out.exists()
    with pytest.raises(NonFiniteOutput, match="vae_decoder"):
        Pipeline.load(tmp_path / "b", backend="ort-cpu")("x", num_inference_steps=2)


def test_generate_never_imports_torch_diffusers_or_transformers(sd1_bundle, tmp_path):
    script = textwrap.dedent(
        f"""
        import sys
        from diffrt.cli import main
        assert main(["generate", {str(sd1_bundle)!r}, "a cat", "-o", {str(tmp_path / "a.png")!r}, "--steps", "2"]) == 0
        from diffrt import Pipeline
        Pipeline.load({str(sd1_bundle)!r})("a cat", num_inference_steps=2, scheduler="unipc")
        heavy = sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules)
        assert not heavy, heavy
        print("clean")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert proc.returncode == 0 and "clean" in proc.stdout, proc.stderr[-2000:]
