"""LoRAs switched per request on the tiny SD1 bundle: the pictures are diffusers' (load_lora_weights +
set_adapters) from the same latents, for kohya and PEFT files touching the UNet (Linear and 3x3 conv) and the
text encoder, at two scales and two LoRAs at once; switching never drifts; bad files are one line."""

from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from diffrt import Pipeline
from diffrt.errors import BadInput
from tests.builders.lora import build_lora

STEPS, TOL, GUIDANCE = 4, 1 / 255, 7.5  # SDXL's pipeline has another default guidance: given to both
PROMPT, NEGATIVE = "a red fox in the snow", "blurry"


@pytest.fixture(scope="module")
def loras(sd1_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return {
        "kohya": build_lora(root / "style.safetensors", sd1_folder, "kohya", seed=1, alpha=2.0),
        "peft": build_lora(root / "other.safetensors", sd1_folder, "peft", seed=2),
    }


@pytest.fixture(scope="module")
def pipe(sd1_bundle):
    return Pipeline.load(sd1_bundle, backend="ort-cpu")


def latents():
    return np.random.default_rng(5).standard_normal((1, 4, 8, 8), dtype=np.float32)


def ours(pipe, loras=()):
    out = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, scheduler="euler", latents=latents(),
               guidance_scale=GUIDANCE,
               height=64, width=64, upscale=False, output_type="np", loras=loras)  # fmt: skip
    return out.images[0]


def theirs(folder, loras=()):
    import diffusers

    if (folder / "text_encoder_2").is_dir():
        ref = diffusers.StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False)
    else:
        ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    names = []
    for i, (path, _) in enumerate(loras):
        ref.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=f"l{i}")
        names.append(f"l{i}")
    if names:
        ref.set_adapters(names, adapter_weights=[s for _, s in loras])
    with torch.no_grad():
        out = ref(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, latents=torch.from_numpy(latents()),
                  guidance_scale=GUIDANCE,
                  height=64, width=64, output_type="np").images[0]  # fmt: skip
    return out


@pytest.mark.parametrize(
    "case",
    [[("kohya", 1.0)], [("kohya", 0.5)], [("peft", 1.0)], [("peft", 0.5)], [("kohya", 0.7), ("peft", 0.4)]],
    ids=["kohya-1", "kohya-0.5", "peft-1", "peft-0.5", "both"],
)
def test_lora_matches_diffusers(pipe, loras, sd1_folder, case):
    chosen = [(loras[k], s) for k, s in case]
    got, want = ours(pipe, chosen), theirs(sd1_folder, chosen)
    assert np.abs(got - want).max() <= TOL, np.abs(got - want).max()
    # the tolerance tells the LoRA, and its scale, apart
    assert np.abs(got - ours(pipe)).max() > 10 * TOL
    half = [(f, s / 2) for f, s in chosen]
    assert np.abs(got - ours(pipe, half)).max() > 3 * TOL


@pytest.mark.parametrize(
    "family, case",
    [("sd2", [("kohya", 1.0)]), ("sd2", [("peft", 0.5)]), ("sd2", [("kohya", 0.5), ("peft", 1.0)]),
     ("sdxl", [("kohya-sgm", 1.0)]), ("sdxl", [("peft", 0.5)]), ("sdxl", [("kohya", 0.6), ("peft", 0.8)])],
    ids=["sd2-kohya-1", "sd2-peft-0.5", "sd2-both", "sdxl-kohya-sgm-1", "sdxl-peft-0.5", "sdxl-both"],
)  # fmt: skip
def test_sd2_and_sdxl_loras_match_diffusers(family, case, request, tmp_path):
    """SD2 (v-prediction) and SDXL: both text encoders (kohya's lora_te1_/lora_te2_) and kohya's SDXL UNet names."""
    folder, bundle = request.getfixturevalue(f"{family}_folder"), request.getfixturevalue(f"{family}_bundle")
    chosen = []
    for i, (layout, scale) in enumerate(case):
        kind, _, sgm = layout.partition("-")
        # size 0.15: updates as large as the tiny weights (0.3 makes the tiny SDXL chaotic: diffusers' own fused and
        # unfused LoRA pictures then differ by 0.1)
        lora = build_lora(tmp_path / f"{layout}.safetensors", folder, kind, seed=20 + i, sgm=bool(sgm), size=0.15)
        chosen.append((lora, scale))
    pipe = Pipeline.load(bundle, backend="ort-cpu")
    got, want = ours(pipe, chosen), theirs(folder, chosen)
    assert np.abs(got - want).max() <= TOL, np.abs(got - want).max()
    assert np.abs(got - ours(pipe)).max() > 10 * TOL
    assert np.abs(got - ours(pipe, [(f, s / 2) for f, s in chosen])).max() > 3 * TOL


def test_switching_a_b_none_is_bit_exact_with_fresh_pipelines(sd1_bundle, loras):
    a, b = [(loras["kohya"], 0.8)], [(loras["peft"], 1.0)]
    one = Pipeline.load(sd1_bundle, backend="ort-cpu")
    seq = [ours(one, a), ours(one, b), ours(one), ours(one, a)]
    fresh = [ours(Pipeline.load(sd1_bundle, backend="ort-cpu"), x) for x in (a, b, ())]
    for got, want in zip(seq, fresh + fresh[:1]):
        np.testing.assert_array_equal(got, want)
    assert one.lora_switch_s > 0


def test_a_lora_written_again_is_read_again(pipe, loras, sd1_folder, tmp_path):
    path = tmp_path / "changing.safetensors"
    shutil.copy(loras["kohya"], path)
    first = ours(pipe, [(path, 1.0)])
    build_lora(path, sd1_folder, "kohya", seed=9)
    assert np.abs(ours(pipe, [(path, 1.0)]) - first).max() > 10 * TOL


def test_a_pickled_lora_is_read_only_when_allowed(sd1_bundle, loras, tmp_path):
    from safetensors.torch import load_file

    pickled = tmp_path / "style.pt"
    torch.save(load_file(str(loras["kohya"])), pickled)
    with pytest.raises(BadInput) as e:
        ours(Pipeline.load(sd1_bundle, backend="ort-cpu"), [(pickled, 0.8)])
    _one_line(e, "style.pt", "pickle", "--allow-pickle")
    allowed = Pipeline.load(sd1_bundle, backend="ort-cpu", allow_pickle=True)
    np.testing.assert_array_equal(ours(allowed, [(pickled, 0.8)]), ours(allowed, [(loras["kohya"], 0.8)]))


def test_scale_zero_is_the_base_model(pipe, loras):
    np.testing.assert_array_equal(ours(pipe, [(loras["kohya"], 0.0)]), ours(pipe))


def _one_line(excinfo, *words):
    message = str(excinfo.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_bad_loras_are_one_line_each(pipe, loras, sd2_folder, tmp_path):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(loras["kohya"].read_bytes()[:200])
    with pytest.raises(BadInput) as e:
        ours(pipe, [(corrupt, 1.0)])
    _one_line(e, "corrupt.safetensors")
    pickle = tmp_path / "style.pt"
    pickle.write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(BadInput) as e:
        ours(pipe, [(pickle, 1.0)])
    _one_line(e, "style.pt", "safetensors")
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(loras["kohya"]))
    unknown = tmp_path / "unknown.safetensors"
    save_file({**tensors, "lora_vae_decoder_conv_in.lora_down.weight": np.ones((4, 4), np.float32)}, str(unknown))
    with pytest.raises(BadInput) as e:
        ours(pipe, [(unknown, 1.0)])
    _one_line(e, "unknown.safetensors", "lora_vae_decoder_conv_in")
    other = build_lora(tmp_path / "sd2.safetensors", sd2_folder, "kohya", seed=3)  # another model's shapes
    with pytest.raises(BadInput) as e:
        ours(pipe, [(other, 1.0)])
    _one_line(e, "sd2.safetensors", "another model")
    for scale in (-1.0, float("nan"), float("inf")):
        with pytest.raises(BadInput) as e:
            ours(pipe, [(loras["kohya"], scale)])
        assert e.value.field == "loras"
        _one_line(e, "scale")
    with pytest.raises(BadInput) as e:
        ours(pipe, [(tmp_path / "missing.safetensors", 1.0)])
    _one_line(e, "missing.safetensors", "does not exist")
    np.testing.assert_array_equal(ours(pipe), ours(Pipeline.load(pipe.bundle, backend="ort-cpu")))  # unharmed


def test_names_in_the_lora_folder_and_a1111_prompt_tags(sd1_bundle, loras, tmp_path):
    folder = tmp_path / "loras"
    (folder / "styles").mkdir(parents=True)
    shutil.copy(loras["kohya"], folder / "styles" / "style.safetensors")  # A1111 finds subfolders' files by name
    shutil.copy(loras["peft"], folder / "other.safetensors")
    named = Pipeline.load(sd1_bundle, backend="ort-cpu", lora_dir=folder)
    want = ours(named, [(loras["kohya"], 0.8), (loras["peft"], 0.5)])
    np.testing.assert_array_equal(ours(named, [("style", 0.8), ("other.safetensors", 0.5)]), want)
    tagged = named(f"{PROMPT}<lora:style:0.8><lora:other:0.5>", negative_prompt=f"<lora:style:1> {NEGATIVE}",
                   num_inference_steps=STEPS, scheduler="euler", latents=latents(), height=64, width=64,
                   upscale=False, output_type="np")  # fmt: skip
    np.testing.assert_array_equal(tagged.images[0], want)  # the tags leave the text; the negative's is ignored
    plain = named(f"{PROMPT} <lora:style:0.8>", prompt_syntax="plain", num_inference_steps=STEPS, latents=latents(),
                  height=64, width=64, upscale=False, output_type="np")  # fmt: skip
    assert np.abs(plain.images[0] - ours(named)).max() > 0  # plain syntax: the tag is text, no LoRA
    for prompt, words in (
        ("a fox <lora:style:strong>", ("<lora:style:strong>", "number")),
        ("a fox <lora::1>", ("names no LoRA",)),
        ("a fox <lora:style:0.5:1>", ("one scale",)),
        ("a fox <lora:missing:1>", ("missing", "not in the LoRA folder", "other, style")),
    ):
        with pytest.raises(BadInput) as e:
            named(prompt, num_inference_steps=STEPS)
        _one_line(e, *words)
    with pytest.raises(BadInput) as e:
        named(["a <lora:style:1>", "b"], num_images=2, num_inference_steps=STEPS)
    _one_line(e, "different <lora:...> tags")
    service = Pipeline.load(sd1_bundle, backend="ort-cpu", lora_dir=folder, lora_paths=False)
    for outside in (str(loras["kohya"]), "../loras/other", "/etc/passwd"):
        with pytest.raises(BadInput) as e:
            service.check_request(service_request(outside))
        _one_line(e, "not in the LoRA folder")
    assert service.check_request(service_request("style")).loras[0][0] == folder / "styles" / "style.safetensors"
    assert named.use_loras([("style", 0.8)]) > 0 and named.use_loras([("style", 0.8)]) == 0.0  # cached: no switch


def service_request(name):
    from diffrt.engine.request import Request

    return Request("a fox", loras=[(name, 1.0)], num_inference_steps=STEPS)


def test_generate_and_bench_take_lora_flags(sd1_bundle, loras, tmp_path, capsys):
    from PIL import Image

    from diffrt.cli import main
    from diffrt.engine.lora import lora_hash

    args = ["generate", str(sd1_bundle), PROMPT, "--steps", "3", "--seed", "2", "--backend", "ort-cpu",
            "--size", "64x64", "--no-upscale"]  # fmt: skip
    assert main([*args, "-o", str(tmp_path / "with.png"), "--lora", f"{loras['kohya']}:0.8"]) == 0
    assert main([*args, "-o", str(tmp_path / "without.png")]) == 0
    with_, without = (Image.open(tmp_path / f"{n}.png") for n in ("with", "without"))
    assert np.abs(np.asarray(with_, np.int16) - np.asarray(without, np.int16)).max() > 10
    direct = Pipeline.load(sd1_bundle, backend="ort-cpu")(PROMPT, num_inference_steps=3, seed=2, height=64, width=64,
                                                           upscale=False, loras=[(loras["kohya"], 0.8)])  # fmt: skip
    np.testing.assert_array_equal(np.asarray(with_), np.asarray(direct.images[0]))
    assert f'Lora hashes: "style: {lora_hash(loras["kohya"])}"' in with_.info["parameters"]
    for bad, words in (([f"{loras['kohya']}:-1"], "scale"), ([str(tmp_path / "nope.safetensors")], "does not exist")):
        assert main([*args, "-o", str(tmp_path / "x.png"), "--lora", *bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("diffrt: error: ") and words in err and not (tmp_path / "x.png").exists()
    out = tmp_path / "bench.json"
    bench = ["bench", str(sd1_bundle), "--backend", "ort-cpu", "--steps", "2", "--size", "64x64", "--runs", "1"]
    assert main([*bench, "--warmup", "0", "--lora", f"{loras['peft']}:0.5", "--json", str(out)]) == 0
    import json

    report = json.loads(out.read_text())
    assert report["lora_switch_s"] > 0 and report["settings"]["loras"] == [[str(loras["peft"]), 0.5]]
    assert "LoRA switch" in capsys.readouterr().out


def reference_with_unet(folder, unet):
    import diffusers

    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, unet=unet)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    with torch.no_grad():
        return ref(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, latents=torch.from_numpy(latents()),
                   guidance_scale=GUIDANCE, height=64, width=64, output_type="np").images[0]  # fmt: skip


@pytest.mark.parametrize("kind", ["loha", "lokr"])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_lycoris_loha_and_lokr_match_peft(pipe, sd1_folder, tmp_path, kind, scale):
    """LyCORIS files in kohya's names against peft's LoHa / LoKr layers (not merged: their own forward)."""
    from tests.builders.lora import build_lycoris

    path, unet = build_lycoris(tmp_path / f"{kind}.safetensors", sd1_folder, kind, seed=4, size=3.0)
    for module in unet.modules():
        if isinstance(getattr(module, "scaling", None), dict) and "default" in module.scaling:
            module.scaling["default"] *= scale
    got, want = ours(pipe, [(path, scale)]), reference_with_unet(sd1_folder, unet)
    assert np.abs(got - want).max() <= TOL, np.abs(got - want).max()
    assert np.abs(got - ours(pipe)).max() > 10 * TOL
    assert np.abs(got - ours(pipe, [(path, scale / 2)])).max() > 3 * TOL


def test_locon_with_a_tucker_core_matches_the_merged_model(pipe, sd1_folder, tmp_path):
    """lora_mid: the update of a 3x3 convolution is up . mid . down (merged here in torch, the reference's way)."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from tests.builders.lora import build_locon_mid

    path = build_locon_mid(tmp_path / "locon.safetensors", sd1_folder, seed=6)
    unet = UNet2DConditionModel.from_pretrained(sd1_folder / "unet")
    parts = load_file(str(path))
    with torch.no_grad():
        for name, module in unet.named_modules():
            key = "lora_unet_" + name.replace(".", "_")
            if f"{key}.lora_mid.weight" in parts:
                down, mid, up = (parts[f"{key}.lora_{p}.weight"] for p in ("down", "mid", "up"))
                rank = down.shape[0]
                # up(mid(down(x))) as one kernel: mid's first axis is its output (up's input)
                kernel = torch.einsum("oa,abij,bc->ocij", up.flatten(1), mid, down.flatten(1))
                module.weight += parts[f"{key}.alpha"] / rank * 0.7 * kernel
    got, want = ours(pipe, [(path, 0.7)]), reference_with_unet(sd1_folder, unet)
    assert np.abs(got - want).max() <= TOL, np.abs(got - want).max()
    assert np.abs(got - ours(pipe)).max() > 10 * TOL


def test_unsupported_lycoris_parts_are_named(pipe, sd1_folder, tmp_path):
    from safetensors.numpy import save_file

    key = "lora_unet_down_blocks_0_resnets_0_conv1"
    for extra, words in (("hada_t1", ("hada_t1",)), ("dora_scale", ("dora_scale",))):
        path = tmp_path / f"{extra}.safetensors"
        save_file({f"{key}.hada_w1_a": np.ones((4, 2), np.float32), f"{key}.{extra}": np.ones((2, 2), np.float32)},
                  str(path))  # fmt: skip
        with pytest.raises(BadInput) as e:
            ours(pipe, [(path, 1.0)])
        _one_line(e, extra, *words)
    path = tmp_path / "half.safetensors"
    save_file({f"{key}.hada_w1_a": np.ones((4, 2), np.float32)}, str(path))
    with pytest.raises(BadInput) as e:
        ours(pipe, [(path, 1.0)])
    _one_line(e, "hada_w1_a", "incomplete")


def test_baked_in_at_export_equals_switching_at_run_time(sd1_folder, sd1_bundle, loras, tmp_path, capsys):
    """`diffrt export --lora`: the LoRAs merged into the weights before export, recorded in the manifest."""
    import json

    from diffrt.cli import main
    from diffrt.engine.lora import lora_hash

    chosen = [(loras["kohya"], 0.8), (loras["peft"], 0.5)]
    out = tmp_path / "baked.bundle"
    flags = [a for f, s in chosen for a in ("--lora", f"{f}:{s}")]
    assert main(["-q", "export", str(sd1_folder), "-o", str(out), *flags]) == 0
    baked = Pipeline.load(out, backend="ort-cpu")
    switched = ours(Pipeline.load(sd1_bundle, backend="ort-cpu"), chosen)
    assert np.abs(ours(baked) - switched).max() <= TOL
    assert np.abs(ours(baked) - ours(Pipeline.load(sd1_bundle, backend="ort-cpu"))).max() > 10 * TOL
    source, base = (json.loads((b / "manifest.json").read_text())["source"] for b in (out, sd1_bundle))
    assert source["loras"] == [{"name": f.name.removesuffix(".safetensors"), "hash": lora_hash(f), "scale": s}
                               for f, s in chosen]  # fmt: skip
    assert source["base_sha256"] == base["sha256"] != source["sha256"]

    pickle = tmp_path / "style.pt"
    pickle.write_bytes(b"\x80\x04K\x01.")
    for bad, words in ((str(pickle), "safetensors"), (f"{loras['kohya']}:-2", "scale"),
                       (str(tmp_path / "none.safetensors"), "does not exist")):  # fmt: skip
        assert main(["-q", "export", str(sd1_folder), "-o", str(tmp_path / "bad.bundle"), "--lora", bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("diffrt: error: ") and words in err, err
        assert not (tmp_path / "bad.bundle").exists() and not list(tmp_path.glob(".bad.bundle*"))


def test_a_backend_that_cannot_switch_weights_refuses_before_running(sd1_bundle, loras):
    """TensorRT's plans are not refittable yet: its reason, given before the request runs (the TensorRT backend
    itself needs a GPU; here ONNX Runtime CPU carries its refusal)."""
    from diffrt.engine.backends import OrtCpuBackend
    from diffrt.engine.trt import TensorRTBackend

    class Refusing(OrtCpuBackend):
        no_lora = TensorRTBackend.no_lora

    pipe = Pipeline(sd1_bundle, Pipeline.load(sd1_bundle, backend="ort-cpu").manifest, Refusing())
    with pytest.raises(BadInput) as e:
        pipe.check_request(service_request(str(loras["kohya"])))
    _one_line(e, "refitting TensorRT plans", "diffrt export --lora")
    assert pipe.check_request(replace(service_request(str(loras["kohya"])), loras=[(loras["kohya"], 0.0)]))
