"""Textual inversion: embedding files read at run time (A1111's, SDXL's and diffusers' layouts), called by name
in a prompt, against diffusers' load_textual_inversion on the tiny SD1 and SDXL checkpoints (1/255 per pixel),
and every kind of file that does not fit skipped with a warning, never a crash."""

from __future__ import annotations

import json
import logging
import struct

import numpy as np
import pytest
import torch

from diffrt import Pipeline
from diffrt.engine.embeddings import load_embeddings
from diffrt.engine.prompts import chunk
from diffrt.engine.safetensors import read_safetensors
from diffrt.errors import BadInput

TOL = 1 / 255
PROMPT, NEGATIVE = "a cute mystyle narwhal", "blue square"


def write_safetensors(path, tensors: dict[str, np.ndarray]) -> None:
    """The format written by hand (little-endian float32), so the reader is tested against the spec."""
    header, body = {}, b""
    for name, array in tensors.items():
        data = np.ascontiguousarray(array, dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [len(body), len(body) + len(data)]}
        body += data
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def vectors(n: int, width: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((n, width)) * 0.5).astype(np.float32)


def latents():
    return np.random.default_rng(3).standard_normal((1, 4, 8, 8), dtype=np.float32)


def ours(pipe, prompt, z, **kw):
    out = pipe(prompt, negative_prompt=NEGATIVE, num_inference_steps=4, scheduler="euler", latents=z, height=64,
               width=64, upscale=False, output_type="np", **kw)  # fmt: skip
    return out.images[0]


def theirs(ref, prompt, z, **kw):
    out = ref(prompt, negative_prompt=NEGATIVE, num_inference_steps=4, latents=torch.from_numpy(z.copy()),
              height=64, width=64, output_type="np", **kw)  # fmt: skip
    return out.images[0]


def test_sd1_embedding_matches_diffusers_load_textual_inversion(sd1_bundle, sd1_folder, tmp_path):
    import diffusers

    emb = vectors(2, 64, seed=5)  # A1111's layout: emb_params (n, D)
    write_safetensors(tmp_path / "mystyle.safetensors", {"emb_params": emb})
    pipe = Pipeline.load(sd1_bundle, backend="ort-cpu", embeddings=tmp_path)
    assert pipe.embeddings["mystyle"].vectors[0].shape == (2, 64)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(sd1_folder, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    ref.load_textual_inversion({"mystyle": torch.from_numpy(emb)}, token="mystyle")
    z = latents()
    mine = ours(pipe, PROMPT, z)
    assert np.abs(mine - theirs(ref, PROMPT, z)).max() <= TOL
    plain = Pipeline.load(sd1_bundle, backend="ort-cpu")  # "mystyle" is only letters there
    assert np.abs(ours(plain, PROMPT, z) - mine).max() > 5 * TOL
    # weights reach the vectors like any token's: (mystyle:1.4) moves the picture
    assert np.abs(ours(pipe, "a cute (mystyle:1.4) narwhal", z) - mine).max() > 2 * TOL
    # prompt_syntax="plain" still knows the name, as diffusers' tokenizer does
    assert np.abs(ours(pipe, PROMPT, z, prompt_syntax="plain") - mine).max() <= TOL


def test_sdxl_embedding_with_both_encoders_matches_diffusers(sdxl_bundle, sdxl_folder, tmp_path):
    import diffusers

    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(sdxl_folder, add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    widths = (ref.text_encoder.config.hidden_size, ref.text_encoder_2.config.hidden_size)
    clip_l, clip_g = vectors(3, widths[0], seed=6), vectors(3, widths[1], seed=7)
    write_safetensors(tmp_path / "mystyle.safetensors", {"clip_l": clip_l, "clip_g": clip_g})
    write_safetensors(tmp_path / "sd15only.safetensors", {"emb_params": vectors(1, widths[0], seed=8)})
    pipe = Pipeline.load(sdxl_bundle, backend="ort-cpu", embeddings=tmp_path)
    assert list(pipe.embeddings) == ["mystyle"]  # the one-encoder file does not fit SDXL
    for state, encoder, tokenizer in ((clip_l, ref.text_encoder, ref.tokenizer),
                                      (clip_g, ref.text_encoder_2, ref.tokenizer_2)):  # fmt: skip
        ref.load_textual_inversion({"mystyle": torch.from_numpy(state)}, token="mystyle", text_encoder=encoder,
                                   tokenizer=tokenizer)  # fmt: skip
    z = latents()
    mine = ours(pipe, PROMPT, z, guidance_scale=5.0)
    assert np.abs(mine - theirs(ref, PROMPT, z, guidance_scale=5.0)).max() <= TOL
    plain = Pipeline.load(sdxl_bundle, backend="ort-cpu")
    assert np.abs(ours(plain, PROMPT, z, guidance_scale=5.0) - mine).max() > 5 * TOL


def test_comfyui_names_and_unknown_names(sd1_bundle, tmp_path, caplog):
    write_safetensors(tmp_path / "mystyle.safetensors", {"emb_params": vectors(2, 64, seed=5)})
    tok = Pipeline.load(sd1_bundle, backend="ort-cpu", embeddings=tmp_path).text_encoders[0].tokenizer
    assert tok.chunks("a embedding:MyStyle cat") == tok.chunks("a mystyle cat")  # names match as A1111's do
    assert len(tok.chunks("a mystyle cat")[0].tokens) < len(tok.chunks("a mystile cat")[0].tokens)
    with caplog.at_level(logging.WARNING, logger="diffrt.engine.tokenizer"):
        unknown = tok.chunks("a embedding:nothere cat")
    assert "'nothere' is not loaded; read as text. Loaded: mystyle" in caplog.text
    assert unknown == tok.chunks("a embedding:nothere cat", quiet=True)  # the text as written


def test_layouts_and_files_that_do_not_fit(tmp_path, caplog):
    write_safetensors(tmp_path / "a1111.safetensors", {"emb_params": vectors(2, 64, 0)})
    write_safetensors(tmp_path / "learned_embeds.safetensors", {"<cat-toy>": vectors(1, 64, 1)[0]})  # diffusers
    write_safetensors(tmp_path / "wide.safetensors", {"emb_params": vectors(2, 1024, 2)})  # an SD2 embedding
    write_safetensors(tmp_path / "odd.safetensors", {"a": vectors(1, 64, 3), "b": vectors(1, 64, 4)})
    write_safetensors(tmp_path / "nan.safetensors", {"emb_params": np.full((1, 64), np.nan, np.float32)})
    write_safetensors(tmp_path / "huge.safetensors", {"emb_params": vectors(80, 64, 5)})
    (tmp_path / "pickle.pt").write_bytes(b"\x80\x04not read")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "a1111.safetensors").read_bytes()[:-9])
    (tmp_path / "junk.safetensors").write_bytes(struct.pack("<Q", 10**12) + b"{}")
    (tmp_path / "notes.txt").write_text("not an embedding")
    with caplog.at_level(logging.WARNING, logger="diffrt.engine.embeddings"):
        found = load_embeddings(tmp_path, [64])
    assert sorted(found) == ["a1111", "learned_embeds"]
    assert found["learned_embeds"].vectors[0].shape == (1, 64)
    skipped = {r.getMessage().split()[1]: r.getMessage() for r in caplog.records}
    names = [f"{n}.safetensors" for n in ("wide", "odd", "nan", "huge", "cut", "junk")] + ["pickle.pt"]
    assert sorted(skipped) == sorted(names)
    assert "[1024] wide; this bundle's are [64]" in skipped["wide.safetensors"]
    assert ".safetensors" in skipped["pickle.pt"] and "pickle" in skipped["pickle.pt"]
    with pytest.raises(BadInput, match="does not exist"):
        load_embeddings(tmp_path / "nowhere", [64])


def test_the_reader_checks_every_offset(tmp_path):
    path = tmp_path / "t.safetensors"
    write_safetensors(path, {"x": np.arange(6, dtype=np.float32).reshape(2, 3)})
    np.testing.assert_array_equal(read_safetensors(path, 1 << 20)["x"], np.arange(6).reshape(2, 3))
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    for bad in ({"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 999]},
                {"dtype": "F32", "shape": [4, 3], "data_offsets": [0, 24]},
                {"dtype": "I8", "shape": [2, 3], "data_offsets": [0, 24]},
                {"dtype": "F32", "shape": [-2, -3], "data_offsets": [0, 24]}):  # fmt: skip
        text = json.dumps({**header, "x": bad}).encode()
        path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])
        with pytest.raises(BadInput, match="t.safetensors"):
            read_safetensors(path, 1 << 20)
    with pytest.raises(BadInput, match="more than"):
        read_safetensors(path, 10)


def test_an_embedding_never_splits_between_chunks():
    rows = tuple(range(1000, 1010))  # ten vectors
    pieces = [([1] * 70 + [rows] + [2] * 3, 1.0)]
    out = chunk(pieces, comma=None, size=75)
    assert [len(c.tokens) for c in out] == [70, 13] and out[1].tokens[:10] == rows


def test_bundles_without_a_token_table_say_to_re_export(sd1_bundle, tmp_path):
    pipe = Pipeline.load(sd1_bundle, backend="ort-cpu")
    pipe.text_encoders[0] = type(pipe.text_encoders[0])(pipe.text_encoders[0].tokenizer, pipe.text_encoders[0].session)
    with pytest.raises(BadInput, match="re-export"):
        pipe.use_embeddings(tmp_path)


def test_generate_and_serve_take_an_embeddings_folder(sd1_bundle, tmp_path, capsys):
    """The CLI's --embeddings and the service's (A1111's listing, a request calling one by name)."""
    pytest.importorskip("fastapi")
    import base64
    import io

    import httpx
    from PIL import Image

    from diffrt.cli import main
    from diffrt.serve.app import ServeSettings, create_app
    from tests.serve.live import LiveServer

    folder = tmp_path / "emb"
    folder.mkdir()
    write_safetensors(folder / "mystyle.safetensors", {"emb_params": vectors(2, 64, seed=5)})
    args = ["generate", str(sd1_bundle), PROMPT, "--steps", "3", "--seed", "2", "--backend", "ort-cpu"]
    assert main([*args, "-o", str(tmp_path / "with.png"), "--embeddings", str(folder)]) == 0
    assert main([*args, "-o", str(tmp_path / "without.png")]) == 0
    with_, without = (np.asarray(Image.open(tmp_path / f"{n}.png"), np.int16) for n in ("with", "without"))
    assert np.abs(with_ - without).max() > 2
    assert main([*args, "-o", str(tmp_path / "x.png"), "--embeddings", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("diffrt: error: ") and "embeddings folder" in err and not (tmp_path / "x.png").exists()

    live = LiveServer(create_app(ServeSettings(str(sd1_bundle), backend="ort-cpu", embeddings=str(folder))))
    try:
        listing = httpx.get(f"{live.base}/sdapi/v1/embeddings").json()
        assert listing["loaded"]["mystyle"]["vectors"] == 2 and listing["loaded"]["mystyle"]["shape"] == 64
        body = {"prompt": PROMPT, "steps": 3, "seed": 2, "sampler_name": "DPM++ 2M", "scheduler": "Karras"}
        r = httpx.post(f"{live.base}/sdapi/v1/txt2img", json=body, timeout=60)
        assert r.status_code == 200, r.text
        served = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))), np.int16)
        assert np.abs(served - with_).max() <= 2
    finally:
        live.stop()
