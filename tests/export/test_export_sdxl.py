"""Export of tiny SDXL and LCM checkpoints: two text encoders, added UNet conditions, a guidance input."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from diffrt.bundle import load_manifest, token_table
from diffrt.export.checkpoint import load_diffusers_folder

XL_COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")


def test_sdxl_export_writes_a_complete_validated_bundle(sdxl_export):
    bundle, result = sdxl_export
    manifest = load_manifest(bundle)
    assert manifest.model.family == "sdxl"
    assert manifest.model.force_zeros_for_empty_prompt
    assert manifest.model.scaling_factor == pytest.approx(0.13025)
    assert manifest.tokenizer_2 is not None and manifest.tokenizer_2.pad_id == 0  # OpenCLIP pads with "!"
    assert manifest.tokenizer.pad_id == manifest.tokenizer.eos_id
    assert (bundle / "tokenizer_2" / "tokenizer.json").is_file()
    assert set(manifest.components) == set(XL_COMPONENTS)
    specs = {name: entry.spec for name, entry in manifest.components.items()}
    assert [t.name for t in specs["unet"].inputs] == [
        "sample",
        "timestep",
        "encoder_hidden_states",
        "text_embeds",
        "time_ids",
    ]
    assert specs["unet"].inputs[2].shape[2] == 64 + 128  # both encoders' widths
    assert specs["unet"].inputs[3].shape == ("batch", 128) and specs["unet"].inputs[4].shape == ("batch", 6)
    assert [t.name for t in specs["text_encoder_2"].outputs] == ["text_embeddings", "text_embeds"]
    for name in XL_COMPONENTS:
        for precision in ("fp32", "fp16"):
            onnx.checker.check_model(str(bundle / manifest.components[name].files[precision]))
    # Every output of every component validated at two shapes, FP32 and FP16.
    labels = {c.component for c in result.checks}
    assert {"text_encoder", "text_encoder_2:text_embeddings", "text_encoder_2:text_embeds", "unet"} <= labels
    for label in labels:
        for precision in ("fp32",) if label.startswith("vae_") else ("fp32", "fp16"):
            rows = [c for c in result.checks if c.component == label and c.precision == precision]
            assert len({c.shape for c in rows}) >= 2, rows
            assert all(c.passed and c.finite for c in rows), rows
    # SDXL's VAE asks for FP32 (force_upcast): the FP16 bundle encodes and decodes with the FP32 graphs
    for name in ("vae_decoder", "vae_encoder"):
        vae = manifest.components[name].files
        assert vae["fp16"] == vae["fp32"] and not (bundle / f"onnx/{name}.fp16.onnx").exists()


def test_sdxl_text_encoders_give_diffusers_conditioning(sdxl_folder, sdxl_bundle):
    """The graphs return what StableDiffusionXLPipeline conditions on: penultimate hidden states of both
    encoders and the second encoder's pooled projection."""
    ckpt = load_diffusers_folder(sdxl_folder)
    manifest = load_manifest(sdxl_bundle)
    ids = np.random.default_rng(0).integers(0, manifest.components["text_encoder"].spec.inputs[0].high, (2, 77))
    ids = ids.astype(np.int32)
    with torch.no_grad():
        one = ckpt.text_encoder(torch.from_numpy(ids).long(), output_hidden_states=True)
        two = ckpt.text_encoder_2(torch.from_numpy(ids).long(), output_hidden_states=True)
    expected = {
        "text_encoder": [one.hidden_states[-2]],
        "text_encoder_2": [two.hidden_states[-2], two.text_embeds],
    }
    for name, refs in expected.items():
        sess = ort.InferenceSession(str(sdxl_bundle / manifest.components[name].files["fp32"]))
        table = np.load(sdxl_bundle / token_table(name))  # the runtime's lookup
        feeds = {"input_ids": ids, "token_embeds": table[ids], "clip_skip": np.zeros(1, np.int32)}
        for got, ref in zip(sess.run(None, feeds), refs):
            assert np.abs(got - ref.numpy()).max() < 1e-4, name


def test_lcm_export_has_a_guidance_input(lcm_export):
    bundle, result = lcm_export
    manifest = load_manifest(bundle)
    assert manifest.model.family == "sd1"
    assert manifest.scheduler["_class_name"] == "LCMScheduler"
    unet = manifest.components["unet"].spec
    assert [t.name for t in unet.inputs][3:] == ["timestep_cond"]
    assert unet.inputs[3].shape == ("batch", 32)
    assert result.checks and all(c.passed for c in result.checks)
