"""Stability's SDXL refiner layout: one text encoder (bigG) and aesthetic-score time ids, exported from a
diffusers folder and from a single file to the same graphs."""

import numpy as np
import onnxruntime as ort
import pytest
from safetensors.torch import load_file

from diffrt.bundle import TOKENIZER, TOKENIZER_2, load_manifest
from diffrt.cli import main
from diffrt.export.checkpoint import load_checkpoint
from tests.builders.single_file import to_single_file


def test_folder_exports_the_second_encoder_alone(sdxl_refiner_export):
    bundle, result = sdxl_refiner_export
    assert result.checks and all(c.passed for c in result.checks)
    m = load_manifest(bundle)
    assert set(m.components) == {"text_encoder_2", "unet", "vae_encoder", "vae_decoder"}
    assert m.tokenizer is None and m.tokenizer_2 is not None
    assert (bundle / TOKENIZER_2).is_file() and not (bundle / TOKENIZER).exists()
    unet = {t.name: t for t in m.components["unet"].spec.inputs}
    assert unet["time_ids"].shape[1] == 5  # original size, crop, aesthetic score
    assert unet["encoder_hidden_states"].shape[2] == m.components["text_encoder_2"].spec.outputs[0].shape[2]
    assert m.model.family == "sdxl" and not m.model.force_zeros_for_empty_prompt


def test_single_file_refiner_exports_the_same_graphs(sdxl_refiner_folder, sdxl_refiner_bundle, tmp_path, capsys):
    path = to_single_file(sdxl_refiner_folder, tmp_path / "refiner.safetensors")
    keys = load_file(path)
    assert any(k.startswith("conditioner.embedders.0.model.") for k in keys)
    assert not any(k.startswith("conditioner.embedders.1.") for k in keys)
    tokenizer = sdxl_refiner_folder / "tokenizer_2"
    folder, single = load_checkpoint(str(sdxl_refiner_folder)), load_checkpoint(str(path), tokenizer=tokenizer)
    assert single.text_encoder is None and single.tokenizer_dir is None
    assert single.unet.config.transformer_layers_per_block[-1] == folder.unet.config.transformer_layers_per_block
    out = tmp_path / "bundle"
    code = main(["export", str(path), "-o", str(out), "--tokenizer", str(tokenizer),
                 "--image-range", "32,64,128", "--no-validate"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    ours, theirs = load_manifest(out), load_manifest(sdxl_refiner_bundle)
    assert ours.model == theirs.model and ours.tokenizer_2 == theirs.tokenizer_2 and ours.tokenizer is None
    for name, entry in theirs.components.items():
        assert ours.components[name].spec == entry.spec, name
        feeds = entry.spec.sample_inputs(entry.spec.opt_dims(), seed=1)
        a = ort.InferenceSession(str(out / ours.components[name].files["fp32"])).run(None, feeds)
        b = ort.InferenceSession(str(sdxl_refiner_bundle / entry.files["fp32"])).run(None, feeds)
        for x, y in zip(a, b):
            assert np.abs(x - y).max() <= 1e-5, (name, np.abs(x - y).max())


@pytest.mark.parametrize("drop", ["tokenizer_2", "text_encoder_2"])
def test_incomplete_refiner_folder_is_one_line(sdxl_refiner_folder, tmp_path, capsys, drop):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(sdxl_refiner_folder, broken)
    shutil.rmtree(broken / drop)
    code = main(["export", str(broken), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("diffrt: error")]
    assert code == 2 and len(errors) == 1 and f"no {drop}/ folder" in errors[0]
    assert not (tmp_path / "out").exists()
