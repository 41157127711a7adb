"""SDXL single files: the builder writes what diffusers' own converters read back to the folder's exact weights
(generative-models key layout), and diffrt's offline conversion exports the same graphs as the folder."""

import numpy as np
import onnxruntime as ort
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from diffrt.bundle import load_manifest
from diffrt.export.bundle_writer import ExportOptions, export_bundle
from tests.builders.single_file import to_single_file

BIG_G = "conditioner.embedders.1.model."


@pytest.fixture(scope="module")
def single(sdxl_folder, tmp_path_factory):
    path = to_single_file(sdxl_folder, tmp_path_factory.mktemp("single-file-sdxl") / "tiny-sdxl.safetensors")
    return path, load_file(path)


def _weights(folder):
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def _same(converted, original):
    assert sorted(converted) == sorted(original)
    for key, value in original.items():
        assert torch.equal(converted[key], value), key


def _flat(state, model):
    """transformers >= 5.6 flattened CLIP text models: no text_model. prefix."""
    return state if hasattr(model, "text_model") else {k.removeprefix("text_model."): v for k, v in state.items()}


def test_layout_is_sdxl_base(single, sdxl_folder):
    _, ckpt = single
    # (diffusers sniffs "xl_base" from bigG's 10th resblock, which a 3-layer tower does not have)
    for key in (
        "model.diffusion_model.label_emb.0.0.weight",
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
        BIG_G + "transformer.resblocks.0.attn.in_proj_weight",
        BIG_G + "text_projection",
        BIG_G + "logit_scale",
    ):
        assert key in ckpt, key
    # bigG keeps every block: SDXL takes the penultimate hidden state at run time, not a shortened tower
    layers = CLIPTextModelWithProjection.config_class.from_pretrained(sdxl_folder / "text_encoder_2").num_hidden_layers
    assert not any(k.startswith(BIG_G + f"transformer.resblocks.{layers}.") for k in ckpt)


def test_diffusers_converters_read_back_the_folder(single, sdxl_folder):
    _, ckpt = single
    unet_config = UNet2DConditionModel.load_config(sdxl_folder / "unet")
    _same(convert_ldm_unet_checkpoint(ckpt, unet_config), _weights(sdxl_folder / "unet"))
    vae_config = AutoencoderKL.load_config(sdxl_folder / "vae")
    _same(convert_ldm_vae_checkpoint(ckpt, vae_config), _weights(sdxl_folder / "vae"))
    one = CLIPTextModel.from_pretrained(sdxl_folder / "text_encoder")
    got = {k: v for k, v in _flat(convert_ldm_clip_checkpoint(ckpt), one).items() if "position_ids" not in k}
    _same(got, _weights(sdxl_folder / "text_encoder"))
    two = CLIPTextModelWithProjection.from_pretrained(sdxl_folder / "text_encoder_2")
    _same(_flat(convert_open_clip_checkpoint(two, ckpt, prefix=BIG_G), two), _weights(sdxl_folder / "text_encoder_2"))


def test_single_file_exports_the_same_graphs_as_the_folder(single, sdxl_folder, sdxl_bundle, tmp_path):
    path, _ = single
    out = tmp_path / "bundle"
    # the folder's image range (a single file does not say its size: it would get SDXL's native 1024)
    opts = ExportOptions(tokenizer=sdxl_folder / "tokenizer", image_range=(32, 64, 128))
    result = export_bundle(str(path), out, opts=opts)
    assert result.checks and all(c.passed for c in result.checks)
    ours, theirs = load_manifest(out), load_manifest(sdxl_bundle)
    assert ours.model == theirs.model  # family, scaling factor, force_zeros_for_empty_prompt, ...
    assert ours.tokenizer == theirs.tokenizer and ours.tokenizer_2 == theirs.tokenizer_2
    assert ours.source["kind"] == "single_file"
    assert {k: v for k, v in ours.scheduler.items() if k != "_class_name"}.items() <= theirs.scheduler.items()
    for name, entry in theirs.components.items():
        assert ours.components[name].spec == entry.spec
        feeds = entry.spec.sample_inputs(entry.spec.opt_dims(), seed=1)
        for precision in ("fp32", "fp16"):
            a = ort.InferenceSession(str(out / ours.components[name].files[precision])).run(None, feeds)
            b = ort.InferenceSession(str(sdxl_bundle / entry.files[precision])).run(None, feeds)
            for x, y in zip(a, b):
                assert np.abs(x - y).max() <= 1e-5, (name, precision, np.abs(x - y).max())
    for name in ("text_encoder", "text_encoder_2"):  # the token embeddings the runtime feeds the encoders
        table = f"embeddings/{name}.npy"
        np.testing.assert_array_equal(np.load(out / table), np.load(sdxl_bundle / table))
