"""Property-based fuzzing (hypothesis) of the parsers and validators that read outside bytes: the safetensors
reader (LoRAs, embeddings, upscalers), the LoRA reader and name lookup, A1111 prompt parsing and LoRA tags,
image decoding, bundle manifests, the ncnn importer and the torch-file reader. The property is the same
everywhere: the input is either read, or refused with a one-line BadInput; nothing else escapes, nothing hangs.

CI runs FUZZ_EXAMPLES cases per target (default 150); a longer run:
    DIFFRT_FUZZ_EXAMPLES=20000 .venv/bin/pytest -q tests/test_fuzz.py -p no:randomly
"""

from __future__ import annotations

import io
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from diffrt.errors import BadInput  # noqa: E402

EXAMPLES = int(os.environ.get("DIFFRT_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def refused_in_one_line(call, *args):
    """Run `call`; a BadInput must be one line. Returns the result, or None when refused."""
    try:
        return call(*args)
    except BadInput as e:
        assert "\n" not in str(e) and str(e), repr(str(e))
        return None


# --- safetensors -----------------------------------------------------------------------------------------------

DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "U8", "BOOL", "F8_E4M3", "X", 3, None]
JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=8))
JSON = st.recursive(
    JSON_LEAF,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


def entry():
    shape = st.lists(st.integers(-2, 9), max_size=4) | JSON
    return (
        st.fixed_dictionaries(
            {
                "dtype": st.sampled_from(DTYPES),
                "shape": shape,
                "data_offsets": st.lists(st.integers(-4, 600), max_size=3),
            }
        )
        | JSON
    )


def safetensors_bytes(header: dict | bytes, body: bytes, length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + body


@FUZZ
@given(
    header=st.dictionaries(st.text(max_size=10), entry(), max_size=5) | st.binary(max_size=64),
    body=st.binary(max_size=512),
    length=st.none() | st.integers(0, 2**64 - 1),
)
@example(header={"": "\n"}, body=b"", length=None)  # found by this test: the entry's newline was in the message
def test_safetensors_reader_reads_or_refuses(tmp_path, header, body, length):
    from diffrt.engine.safetensors import read_safetensors, safetensors_metadata

    path = tmp_path / "x.safetensors"
    path.write_bytes(safetensors_bytes(header, body, length))
    got = refused_in_one_line(read_safetensors, path, 1 << 20)
    if got is not None:
        assert all(isinstance(v, np.ndarray) for v in got.values())
    refused_in_one_line(safetensors_metadata, path, 1 << 20)


@FUZZ
@given(data=st.binary(max_size=256))
def test_safetensors_reader_on_raw_bytes(tmp_path, data):
    from diffrt.engine.safetensors import read_safetensors

    path = tmp_path / "raw.safetensors"
    path.write_bytes(data)
    refused_in_one_line(read_safetensors, path, 1 << 20)


# --- LoRA files and names ----------------------------------------------------------------------------------------

TINY_MAP = {
    "unet": {"fp32": {
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight": [{"shape": [8, 8], "transposed": True}],
        "down_blocks.0.resnets.0.conv1.weight": [{"shape": [8, 4, 3, 3], "transposed": False}],
    }, "unused": {}},
    "text_encoder": {"fp32": {"encoder.layers.0.self_attn.q_proj.weight": [{"shape": [6, 6], "transposed": True}]}},
}  # fmt: skip
MODULES = [
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
    "lora_unet_down_blocks_0_resnets_0_conv1",
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
    "lora_unet_input_blocks_1_0_in_layers_2",
    "lora_unet_middle_block_1_proj_in",
    "lora_te2_encoder_layers_0_mlp_fc1",
    "unet.down_blocks.0.resnets.0.conv1",
    "text_encoder.encoder.layers.0.self_attn.q_proj",
]
PARTS = [".lora_down.weight", ".lora_up.weight", ".lora_mid.weight", ".alpha", ".hada_w1_a", ".hada_w1_b",
         ".hada_w2_a", ".hada_w2_b", ".lokr_w1", ".lokr_w2_a", ".lokr_w2_b", ".lora_A.weight", ".lora_B.weight",
         ".dora_scale", ""]  # fmt: skip
ARRAYS = st.lists(st.integers(0, 9), min_size=0, max_size=4).map(
    lambda shape: np.random.default_rng(len(shape)).standard_normal(shape).astype(np.float32)
)


@FUZZ
@given(
    tensors=st.dictionaries(
        st.tuples(st.sampled_from(MODULES), st.sampled_from(PARTS)).map("".join), ARRAYS, max_size=8
    ),  # fmt: skip
    scale=st.floats(0, 4),
)
# found by this test: 0-d factors and an empty alpha were IndexErrors
@example(tensors={f"{MODULES[0]}.lora_down.weight": np.array(1.0, np.float32),
                  f"{MODULES[0]}.lora_up.weight": np.array(1.0, np.float32)}, scale=1.0)  # fmt: skip
@example(tensors={f"{MODULES[0]}.alpha": np.zeros(0, np.float32)}, scale=1.0)
def test_lora_reader_reads_or_refuses(tmp_path, tensors, scale):
    from safetensors.numpy import save_file

    from diffrt.engine.lora import WeightMap, read_lora

    path = tmp_path / "fuzz.safetensors"
    save_file(tensors, str(path))
    wmap = WeightMap(json.loads(json.dumps(TINY_MAP)))
    modules = refused_in_one_line(read_lora, path, wmap)
    for m in modules or []:  # what is read merges into the weight's own shape
        shape = wmap.shape(m.component, m.weight)
        assert (scale * m.delta(shape)).shape == shape


@FUZZ
@given(name=st.text(max_size=30) | st.sampled_from(["..", ".", "/", "../x", "a/../../x", "~", "style", "\\x", ""]))
@example(name="\x00")  # found by this test: a NUL in a name was a ValueError (a 500 in the service)
def test_a_lora_name_never_leaves_the_folder(tmp_path_factory, name):
    from diffrt.engine.lora import find_lora

    root = tmp_path_factory.mktemp("fuzzroot")
    (root / "loras").mkdir()
    (root / "loras" / "style.safetensors").write_bytes(b"x")
    (root / "secret.safetensors").write_bytes(b"x")
    found = refused_in_one_line(find_lora, name, root / "loras", False)
    if found is not None:
        assert found.resolve().is_relative_to((root / "loras").resolve()) and found.is_file()


# --- prompts ----------------------------------------------------------------------------------------------------

PROMPT_CHARS = st.text(alphabet=st.sampled_from(list("ab ,:()[]\\<>.0123456789-+BREAKlora_")), max_size=60)


@FUZZ
@given(text=PROMPT_CHARS | st.text(max_size=40))
def test_prompt_parsing_never_fails_and_lora_tags_read_or_refuse(text):
    from diffrt.engine.lora import lora_tags
    from diffrt.engine.prompts import parse

    fragments = parse(text)  # A1111's syntax reads any text: a bracket it cannot pair is text
    assert all(f is None or (isinstance(f[0], str) and isinstance(f[1], float)) for f in fragments)
    taken = refused_in_one_line(lora_tags, text)
    if taken is not None:
        rest, tags = taken
        assert len(rest) <= len(text) and all(isinstance(n, str) and n and isinstance(s, float) for n, s in tags)


# --- images -----------------------------------------------------------------------------------------------------


def _picture(mode: str, size: tuple[int, int], fmt: str, frames: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(size[0] * 31 + size[1])
    base = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    if mode == "I;16":
        im = Image.fromarray(rng.integers(0, 65536, (size[1], size[0]), dtype=np.uint16))
    else:
        im = base.convert(mode)
    buf = io.BytesIO()
    if frames > 1 and fmt in ("GIF", "PNG", "WEBP"):
        im.save(buf, format=fmt, save_all=True, append_images=[im.rotate(90)] * (frames - 1))
    else:
        im.save(buf, format=fmt)
    return buf.getvalue()


@FUZZ
@given(
    mode=st.sampled_from(["RGB", "RGBA", "L", "LA", "P", "CMYK", "I;16", "1", "I", "F"]),
    size=st.tuples(st.integers(1, 40), st.integers(1, 40)),
    fmt=st.sampled_from(["PNG", "JPEG", "WEBP", "GIF", "TIFF", "BMP"]),
    frames=st.integers(1, 3),
    cut=st.none() | st.integers(0, 400),
)
def test_image_decoding_reads_or_refuses(mode, size, fmt, frames, cut):
    from diffrt.engine.images import decode_image, init_image_array

    try:
        data = _picture(mode, size, fmt, frames)
    except (OSError, ValueError, KeyError):
        return  # PIL cannot write this mode in this format: nothing to decode
    if cut is not None:
        data = data[:cut]  # truncated upload
    got = refused_in_one_line(decode_image, data, "image")
    if got is not None:
        a = init_image_array(got[0], 16, 16)
        assert a.shape == (1, 3, 16, 16) and np.isfinite(a).all() and np.abs(a).max() <= 1


def test_an_image_claiming_huge_dimensions_is_refused_without_decoding():
    from PIL import Image

    from diffrt.engine.images import decode_image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", 100_000, 100_000)  # IHDR width and height (CRC left stale)
    with pytest.raises(BadInput) as e:
        decode_image(bytes(data), "image")
    assert "\n" not in str(e.value)


# --- manifests --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifest_text(sd1_bundle) -> str:
    return (Path(sd1_bundle) / "manifest.json").read_text()


def _paths(d, prefix=()):
    if isinstance(d, dict):
        for k, v in d.items():
            yield (*prefix, k)
            yield from _paths(v, (*prefix, k))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            yield (*prefix, i)
            yield from _paths(v, (*prefix, i))


@FUZZ
@given(data=st.data())
def test_a_mutated_manifest_loads_or_is_refused(tmp_path_factory, manifest_text, data):
    from diffrt.bundle import load_manifest

    d = json.loads(manifest_text)
    paths = list(_paths(d))
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        parent = d
        try:
            for k in path[:-1]:
                parent = parent[k]
            if data.draw(st.booleans()):
                del parent[path[-1]]
            else:
                parent[path[-1]] = data.draw(JSON)
        except (KeyError, IndexError, TypeError):
            continue
    bundle = tmp_path_factory.mktemp("mutated")
    (bundle / "manifest.json").write_text(json.dumps(d))
    refused_in_one_line(load_manifest, bundle)


@pytest.mark.parametrize(
    "path, value",
    [(("components",), None), (("components", "unet", "files", "fp32"), None), (("model",), {"\n": 1}),
     (("components", "unet", "spec", "dims", 0, 1), None),
     (("components", "vae_encoder", "spec", "derived", 0), ["height", "latent_height", float("inf")])],
)  # fmt: skip
def test_manifest_fields_of_the_wrong_type_are_refused(tmp_path, sd1_bundle, manifest_text, path, value):
    """Found by the test above: null components, a null graph path, an infinite size factor were a TypeError, an
    AttributeError and an OverflowError."""
    from diffrt.bundle import load_manifest

    for item in Path(sd1_bundle).iterdir():  # the bundle's files, but this manifest
        if item.name != "manifest.json":
            (tmp_path / item.name).symlink_to(item)
    d = json.loads(manifest_text)
    parent = d
    for k in path[:-1]:
        parent = parent[k]
    parent[path[-1]] = value
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(BadInput) as e:
        load_manifest(tmp_path)
    assert "\n" not in str(e.value) and "malformed" in str(e.value)


@FUZZ
@given(text=st.binary(max_size=200))
def test_a_corrupt_manifest_is_refused(tmp_path_factory, text):
    from diffrt.bundle import load_manifest

    bundle = tmp_path_factory.mktemp("corrupt")
    (bundle / "manifest.json").write_bytes(text)
    refused_in_one_line(load_manifest, bundle)


# --- ncnn -------------------------------------------------------------------------------------------------------

NCNN_LINES = st.lists(
    st.lists(st.sampled_from(["7767517", "3", "4", "Input", "Convolution", "conv0", "data", "out", "1", "0=4", "1=3",
                              "6=108", "5=1", "4=1", "PReLU", "-23330=4,3,8,8,4", "x", "=", "0=", "2.5", "-1"]),
             max_size=10).map(" ".join), max_size=8,
).map(lambda lines: "\n".join(lines))  # fmt: skip


@FUZZ
@given(param=NCNN_LINES | st.text(max_size=80), blob=st.binary(max_size=600))
def test_ncnn_reader_reads_or_refuses(tmp_path, param, blob):
    from diffrt.export.ncnn import read_ncnn

    if param.strip() and not param.startswith("7767517"):
        param = "7767517\n" + param  # past the magic more often
    (tmp_path / "m.param").write_text(param)
    (tmp_path / "m.bin").write_bytes(blob)
    refused_in_one_line(read_ncnn, tmp_path / "m.param", tmp_path / "m.bin")


# --- requests ---------------------------------------------------------------------------------------------------

ODD = st.one_of(st.none(), st.booleans(), st.integers(-(2**65), 2**65), st.floats(), st.text(max_size=6),
                st.lists(st.integers(-3, 3), max_size=3))  # fmt: skip


def field_value(*good):
    return st.sampled_from(good) | ODD


@pytest.fixture(scope="module")
def sd1_manifest(sd1_bundle):
    from diffrt.bundle import load_manifest

    return load_manifest(sd1_bundle)


@FUZZ
@given(
    fields=st.fixed_dictionaries(
        {},
        optional={
            "prompt": st.text(max_size=30) | st.lists(st.text(max_size=8), max_size=3) | ODD,
            "negative_prompt": field_value("blurry"),
            "prompt_syntax": field_value("a1111", "plain"),
            "clip_skip": field_value(1, 2, 12),
            "num_inference_steps": field_value(1, 3, 1000),
            "guidance_scale": field_value(0.0, 7.5),
            "scheduler": field_value("euler", "DPM++ 2M Karras", "lcm", "ddim"),
            "height": field_value(32, 64, 72, 4096),
            "width": field_value(32, 64),
            "num_images": field_value(1, 2, 9),
            "seed": field_value(0, 2**63, [1, 2]),
            "output_type": field_value("np", "pil"),
            "strength": field_value(0.5, 1.0),
            "mask_blur": field_value(0, 4),
            "refiner_at": field_value(0.8),
            "loras": st.lists(st.tuples(st.text(max_size=6), ODD), max_size=2) | ODD,
            "original_size": field_value((64, 64)),
            "crops_coords_top_left": field_value((0, 0)),
            "hires_scale": field_value(1.5, 2.0, 9.0),
            "image": st.none() | st.binary(max_size=64),
        },
    ),  # fmt: skip
)
def test_request_validation_resolves_or_refuses(sd1_manifest, fields):
    from diffrt.engine.hires import HiresOptions
    from diffrt.engine.request import Request

    if "hires_scale" in fields:
        fields["hires"] = HiresOptions(scale=fields.pop("hires_scale"))
    prompt = fields.pop("prompt", "a fox")
    try:
        request = Request(prompt, **fields)
    except TypeError:
        return  # not a keyword Request takes
    resolved = refused_in_one_line(request.resolve, sd1_manifest)
    if resolved is not None:
        assert resolved.resolved and len(resolved.prompts) == resolved.num_images == len(resolved.seeds)


# --- torch-saved files (allow_pickle) ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch_file_bytes() -> bytes:
    torch = pytest.importorskip("torch")
    buf = io.BytesIO()
    torch.save({"a": torch.randn(3, 4), "b": torch.arange(6).half()[1:], "n": "x"}, buf)
    return buf.getvalue()


@FUZZ
@given(data=st.data())
def test_a_damaged_torch_file_reads_or_is_refused(tmp_path, torch_file_bytes, data):
    from diffrt.engine.torchfile import read_torch_file

    raw = bytearray(torch_file_bytes)
    for _ in range(data.draw(st.integers(1, 8))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    path = tmp_path / "x.pt"
    path.write_bytes(bytes(raw[: data.draw(st.integers(0, len(raw)))]))
    refused_in_one_line(read_torch_file, path, 1 << 20)
