"""The demo training script on a few steps: it writes a diffusers folder that diffusers loads, and a run stopped
part-way and resumed ends with the same weights as an uninterrupted one."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from diffrt.demo.train import main

TINY = ["--vae-steps", "3", "--vae-batch", "4", "--scenes", "64", "--unet-steps", "4", "--unet-batch", "4",
        "--warmup", "2", "--save-every-s", "0"]  # fmt: skip


def weights(folder):
    """All weights of the saved folder, by name."""
    files = [folder / n / "diffusion_pytorch_model.safetensors" for n in ("unet", "vae")]
    return {k: v for f in [*files, folder / "text_encoder" / "model.safetensors"] for k, v in load_file(f).items()}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    main(["--work", str(root / "work"), "--out", str(root / "out"), *TINY])
    return root / "out"


def test_writes_a_diffusers_folder_that_diffusers_runs(straight):
    import diffusers
    import torch

    index = json.loads((straight / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert all(v.dtype == np.float16 for v in weights(straight).values())
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(straight, torch_dtype=torch.float32, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.tokenizer.model_max_length == 24 and pipe.vae.config.scaling_factor != 0.18215
    image = pipe("a red circle on the left on a blue background", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


def test_a_stopped_run_resumes_to_the_same_weights(straight, tmp_path, caplog):
    work, out = tmp_path / "work", tmp_path / "out"
    args = ["--work", str(work), "--out", str(out), *TINY]
    main([*args, "--max-steps-this-run", "5"])  # the 3 VAE steps and 2 of the 4 UNet steps
    assert not out.exists() and (work / "unet.pt").exists()
    with caplog.at_level("INFO", logger="diffrt.demo.train"):
        main(args)
    assert "resumed unet.pt at step 2" in caplog.text
    a, b = weights(straight), weights(out)
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_refuses_to_resume_with_other_settings(straight, tmp_path):
    main(["--work", str(tmp_path), "--out", str(tmp_path / "o"), *TINY, "--max-steps-this-run", "1"])
    with pytest.raises(SystemExit, match="other settings"):
        main(["--work", str(tmp_path), "--out", str(tmp_path / "o"), *TINY[:-2], "--save-every-s", "5"])
