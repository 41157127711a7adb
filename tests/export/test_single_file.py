"""Single-file (CompVis / A1111 layout) checkpoints export offline to the same graphs' outputs as their folder."""

import numpy as np
import onnxruntime as ort
import pytest

from diffrt.bundle import load_manifest
from diffrt.cli import main
from diffrt.export.bundle_writer import ExportOptions, export_bundle
from tests.builders.single_file import to_single_file


@pytest.mark.parametrize("flavour", ["sd1", "sd2"])
def test_single_file_round_trip_matches_the_folder_export(flavour, request, tmp_path):
    folder = request.getfixturevalue(f"{flavour}_folder")
    folder_bundle = request.getfixturevalue(f"{flavour}_bundle")
    single = to_single_file(folder, tmp_path / f"{flavour}.safetensors")
    out = tmp_path / "bundle"
    result = export_bundle(
        str(single), out, opts=ExportOptions(tokenizer=folder / "tokenizer", image_range=(32, 64, 128))
    )
    assert result.checks and all(c.passed for c in result.checks)
    ours, theirs = load_manifest(out), load_manifest(folder_bundle)
    assert ours.model.family == theirs.model.family == flavour
    assert ours.model.prediction_type == theirs.model.prediction_type
    assert ours.source["kind"] == "single_file"
    for name, entry in theirs.components.items():
        spec = entry.spec
        feeds = spec.sample_inputs(spec.opt_dims(), seed=1)
        for precision in ("fp32", "fp16"):
            a = ort.InferenceSession(str(out / ours.components[name].files[precision])).run(None, feeds)[0]
            b = ort.InferenceSession(str(folder_bundle / entry.files[precision])).run(None, feeds)[0]
            assert np.abs(a - b).max() <= 1e-5, (name, precision, np.abs(a - b).max())
    assert (out / "tokenizer/tokenizer.json").read_text() == (folder_bundle / "tokenizer/tokenizer.json").read_text()
    table = "embeddings/text_encoder.npy"  # the token embeddings the runtime feeds the text encoder
    np.testing.assert_array_equal(np.load(out / table), np.load(folder_bundle / table))


def test_single_file_with_a_non_clip_vocabulary_needs_a_tokenizer(sd1_folder, tmp_path, capsys):
    single = to_single_file(sd1_folder, tmp_path / "sd1.safetensors")
    out = tmp_path / "b"
    assert main(["export", str(single), "-o", str(out)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--tokenizer" in last and not out.exists()
