"""Export of tiny SD1/SD2 checkpoints: real graphs, real ONNX Runtime sessions, validated against torch."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from tokenizers import Tokenizer

from diffrt.bundle import SCHEMA_VERSION, load_manifest
from diffrt.export.fp16 import FLOAT, HALF, fp16_fraction

COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")


@pytest.mark.parametrize("flavour", ["sd1", "sd2"])
def test_export_writes_a_complete_validated_bundle(flavour, request):
    bundle, result = request.getfixturevalue(f"{flavour}_export")
    manifest = load_manifest(bundle)
    assert manifest.model.prediction_type == ("epsilon" if flavour == "sd1" else "v_prediction")
    assert manifest.model.family == flavour
    assert manifest.model.vae_scale_factor == 8 and manifest.model.latent_channels == 4
    assert manifest.scheduler["steps_offset"] == 1
    assert set(manifest.components) == set(COMPONENTS)
    for name in COMPONENTS:
        for precision in ("fp32", "fp16"):
            onnx.checker.check_model(str(bundle / manifest.components[name].files[precision]))
    # Every component and precision validated at two shapes, one of them non-square for the spatial ones.
    for name in COMPONENTS:
        for precision in ("fp32", "fp16"):
            rows = [c for c in result.checks if c.component.split(":")[0] == name and c.precision == precision]
            assert len({c.shape for c in rows}) >= 2, rows
            assert all(c.passed and c.finite for c in rows), rows
    unet_shapes = {c.shape for c in result.checks if c.component == "unet"}
    assert any("latent_height=8 latent_width=4" in s for s in unet_shapes), unet_shapes
    assert not list(bundle.parent.glob(".*partial*")), "temporary export directory left behind"


@pytest.mark.parametrize("flavour", ["sd1", "sd2"])
def test_fp16_graphs_hold_fp16_weights_with_fp32_islands(flavour, request):
    bundle = request.getfixturevalue(f"{flavour}_bundle")
    manifest = load_manifest(bundle)
    for name in COMPONENTS:
        model = onnx.load(str(bundle / manifest.components[name].files["fp16"]))
        assert fp16_fraction(model) > 0.9, name
        # what stays FP32: normalisation parameters, small constants (timestep frequencies), and the text
        # encoder's position embeddings, added to the FP32 token embeddings it is given (6 % of this tiny encoder)
        big = [t for t in model.graph.initializer if t.data_type == FLOAT and np.prod(t.dims) > 256]
        assert all(name == "text_encoder" and list(t.dims)[-2:] == [77, 64] for t in big), (name, big)
        inits = {t.name: t.data_type for t in model.graph.initializer}
        heavy = [n for n in model.graph.node if n.op_type in ("Conv", "MatMul", "Gemm") and n.input[1] in inits]
        assert heavy and all(inits[n.input[1]] == HALF for n in heavy), name
        types = {vi.name: vi.type.tensor_type.elem_type for vi in model.graph.value_info}
        types.update({t.name: t.data_type for t in model.graph.initializer})
        norms = [n for n in model.graph.node if n.op_type in ("LayerNormalization", "InstanceNormalization")]
        assert norms and all(types.get(n.input[0]) == FLOAT for n in norms), name
        # Graph boundaries stay FP32 so both precisions take the same arrays.
        assert all(o.type.tensor_type.elem_type == FLOAT for o in model.graph.output)


def test_sd2_attention_scores_run_in_fp32(sd2_bundle):
    model = onnx.load(str(sd2_bundle / "onnx/unet.fp16.onnx"))
    types = {vi.name: vi.type.tensor_type.elem_type for vi in model.graph.value_info}
    softmax = [n for n in model.graph.node if n.op_type == "Softmax"]
    assert softmax and all(types.get(n.input[0]) == FLOAT for n in softmax)


def test_timestep_embedding_stays_fp32(sd1_bundle):
    """sin/cos of t * frequency in FP16 is wrong by a whole radian at t ~ 999."""
    model = onnx.load(str(sd1_bundle / "onnx/unet.fp16.onnx"))
    types = {vi.name: vi.type.tensor_type.elem_type for vi in model.graph.value_info}
    trig = [n for n in model.graph.node if n.op_type in ("Sin", "Cos")]
    assert trig and all(types.get(n.input[0]) == FLOAT for n in trig)


@pytest.mark.parametrize("flavour", ["sd1", "sd2"])
def test_tokenizer_json_matches_the_checkpoint_tokenizer(flavour, request):
    from transformers import CLIPTokenizer

    bundle = request.getfixturevalue(f"{flavour}_bundle")
    folder = request.getfixturevalue(f"{flavour}_folder")
    reference = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    tok = Tokenizer.from_file(str(bundle / "tokenizer/tokenizer.json"))
    manifest = load_manifest(bundle)
    for prompt in ["a red circle", "A Cute  NARWHAL, photo!", "unseen wordz 123"]:
        assert tok.encode(prompt).ids == reference(prompt).input_ids
    assert manifest.tokenizer.pad_id == reference.pad_token_id
    assert manifest.tokenizer.max_length == 77
    assert (manifest.tokenizer.pad_id == manifest.tokenizer.eos_id) == (flavour == "sd1")


def test_fp16_unet_stays_close_to_fp32_at_every_timestep(sd1_bundle):
    """The timestep range ends are where FP16 embeddings break: check both graphs agree across it."""
    manifest = load_manifest(sd1_bundle)
    spec = manifest.components["unet"].spec
    s32 = ort.InferenceSession(str(sd1_bundle / "onnx/unet.fp32.onnx"), providers=["CPUExecutionProvider"])
    s16 = ort.InferenceSession(str(sd1_bundle / "onnx/unet.fp16.onnx"), providers=["CPUExecutionProvider"])
    feeds = spec.sample_inputs({"batch": 4, "latent_height": 8, "latent_width": 8, "text_chunks": 1}, seed=3)
    feeds["timestep"] = np.array([1, 250, 750, 999], np.float32)
    a, b = s32.run(None, feeds)[0], s16.run(None, feeds)[0]
    for i in range(4):
        cos = float(a[i].ravel() @ b[i].ravel() / np.linalg.norm(a[i]) / np.linalg.norm(b[i]))
        assert cos > 0.999, (feeds["timestep"][i], cos)


def test_manifest_is_plain_json_with_tool_versions(sd1_bundle):
    d = json.loads((sd1_bundle / "manifest.json").read_text())
    assert d["schema_version"] == SCHEMA_VERSION == 2
    assert {"diffrt", "torch", "onnx", "onnxruntime"} <= set(d["tools"])
    assert len(d["source"]["sha256"]) == 64
