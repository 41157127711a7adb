"""Every bad input to `diffrt export`: exit code 2, one line on stderr naming problem and fix, nothing on disk."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from diffrt.cli import main


def run_export(capsys, *args):
    code = main(["export", *map(str, args)])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def assert_clean_failure(code, message, out, *words):
    assert code == 2
    assert message.startswith("diffrt: error: ")
    assert "\n" not in message
    for w in words:
        assert w.lower() in message.lower(), (w, message)
    assert not out.exists(), "output written despite the error"
    assert not list(out.parent.glob(f".{out.name}.partial-*")), "temporary directory left behind"


@pytest.fixture
def broken_copy(sd1_folder, tmp_path):
    """A writable copy of the tiny SD1 checkpoint to break."""
    dst = tmp_path / "ckpt"
    shutil.copytree(sd1_folder, dst)
    return dst


def test_missing_path(capsys, tmp_path):
    out = tmp_path / "b"
    assert_clean_failure(*run_export(capsys, tmp_path / "nope", "-o", out), out, "does not exist")


def test_folder_that_is_not_a_checkpoint(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "b"
    assert_clean_failure(*run_export(capsys, tmp_path / "empty", "-o", out), out, "model_index.json")


def test_malformed_model_index(capsys, broken_copy, tmp_path):
    (broken_copy / "model_index.json").write_text("{ not json")
    out = tmp_path / "b"
    assert_clean_failure(*run_export(capsys, broken_copy, "-o", out), out, "malformed", "model_index.json")


def test_sdxl_base_saved_by_the_img2img_class_loads_as_sdxl(sdxl_folder, tmp_path):
    """StableDiffusionXLImg2ImgPipeline with both text encoders is an SDXL base saved through the img2img class."""
    from diffrt.export.checkpoint import load_diffusers_folder

    folder = tmp_path / "xl"
    shutil.copytree(sdxl_folder, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLImg2ImgPipeline"}))
    ckpt = load_diffusers_folder(folder)
    assert ckpt.text_encoder is not None and ckpt.text_encoder_2 is not None


def test_sdxl_folder_without_its_second_text_encoder(capsys, broken_copy, tmp_path):
    index = json.loads((broken_copy / "model_index.json").read_text())
    (broken_copy / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLPipeline"}))
    out = tmp_path / "b"
    assert_clean_failure(*run_export(capsys, broken_copy, "-o", out), out, "text_encoder_2", "incomplete")


def test_truncated_weights(capsys, broken_copy, tmp_path):
    weights = next((broken_copy / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = tmp_path / "b"
    assert_clean_failure(*run_export(capsys, broken_copy, "-o", out), out, "unet", "corrupt")


def test_corrupt_single_file(capsys, tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(os.urandom(4096))
    out = tmp_path / "b"
    assert_clean_failure(*run_export(capsys, bad, "-o", out), out, "corrupt")


def test_single_file_that_is_not_stable_diffusion(capsys, tmp_path):
    other = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(4, 4)}, str(other))
    out = tmp_path / "b"
    assert_clean_failure(*run_export(capsys, other, "-o", out), out, "not a Stable Diffusion checkpoint")


def test_sdxl_single_file_is_refused_by_name(capsys, tmp_path):
    xl = tmp_path / "xl.safetensors"
    save_file({"conditioner.embedders.0.transformer.text_model.x": torch.zeros(1)}, str(xl))
    out = tmp_path / "b"
    assert_clean_failure(*run_export(capsys, xl, "-o", out), out, "SDXL")


def test_upscaler_that_is_not_recognised(capsys, sd1_folder, tmp_path):
    junk = tmp_path / "junk.safetensors"
    save_file({"some.layer.weight": torch.randn(3, 3)}, str(junk))
    out = tmp_path / "b"
    assert_clean_failure(*run_export(capsys, sd1_folder, "-o", out, "--upscaler", junk), out, "upscaler")


@pytest.mark.parametrize("k", ["0", "9"])
def test_prompt_chunks_out_of_range(capsys, sd1_folder, tmp_path, k):
    out = tmp_path / "b"
    assert_clean_failure(
        *run_export(capsys, sd1_folder, "-o", out, "--prompt-chunks", k), out, "--prompt-chunks", "1 to 8"
    )


def test_existing_output_without_force(capsys, sd1_folder, tmp_path):
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, message = run_export(capsys, sd1_folder, "-o", out)
    assert code == 2 and "--force" in message and "\n" not in message
    assert (out / "keep.txt").read_text() == "mine", "existing output was touched"


def test_hub_id_offline_says_how_to_get_it(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "b"
    assert_clean_failure(*run_export(capsys, "someone/some-model", "-o", out), out, "hub", "local folder")


def test_cli_process_exit_code_and_single_line(tmp_path):
    """The real console entry point, as a user runs it."""
    out = tmp_path / "b"
    proc = subprocess.run(
        [sys.executable, "-m", "diffrt.cli", "export", str(tmp_path / "missing"), "-o", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "does not exist" in proc.stderr
    assert not out.exists()
