"""TensorRT backend on CPU: profiles from real specs, plan cache keys, reuse and refusal, error wording, and the
TensorRT / cuda-python names the code uses checked against the real packages (the tensorrt bindings wheel's
extension module, cuda-bindings' runtime module). Engines themselves run in test_trt_gpu.py."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from diffrt.bundle import ComponentEntry, Manifest, ModelInfo, TokenizerInfo
from diffrt.cli import add_build_parser, cmd_build, options_from_args
from diffrt.engine import trt_build as tb
from diffrt.engine.trt import TensorRTBackend, bundle_root, request_hint
from diffrt.engine.trt_build import BuildOptions, profile_shapes, reuse_decision, timing_seed
from diffrt.engine.trt_env import Environment, available_reason
from diffrt.errors import BadInput
from diffrt.specs import SDShapes, sd_specs, upscaler_spec

ENGINE = Path(__file__).resolve().parents[2] / "diffrt" / "engine"
TRT_BINDINGS = "tensorrt_cu13_bindings==11.4.0.106"  # the TensorRT 11 Python bindings DESIGN.md was checked against
SD15 = SDShapes(
    vocab_size=49408, max_length=77, text_hidden=768, latent_channels=4, unet_out_channels=4, vae_scale_factor=8,
    unet_downsamples=3, image_opt=512, image_min=256, image_max=1024, max_images=4,
)  # fmt: skip
MODEL = ModelInfo("sd1", "epsilon", 4, 8, 0.18215, 512)
ENV = Environment("11.4.0.106", "NVIDIA H100 80GB HBM3", "9.0")


@pytest.fixture(scope="module")
def specs():
    return {**sd_specs(SD15), "upscaler": upscaler_spec(scale=4, tile=256)}


def shapes(profile, which):
    return {n: s[("min", "opt", "max").index(which)] for n, s in profile.items()}


# ---- profiles ---------------------------------------------------------------------------------------------


def test_static_profile_is_native_size_one_image_with_guidance(specs):
    unet = profile_shapes(specs["unet"], BuildOptions(), MODEL)
    assert unet == {
        "sample": ((2, 4, 64, 64),) * 3,
        "timestep": ((2,),) * 3,
        "encoder_hidden_states": ((2, 77, 768), (2, 77, 768), (2, 3 * 77, 768)),  # 1 to 3 prompt chunks
    }
    text = {"input_ids": ((2, 77),) * 3, "token_embeds": ((2, 77, 768),) * 3}  # the runtime looks tokens up
    assert profile_shapes(specs["text_encoder"], BuildOptions(), MODEL) == text
    assert profile_shapes(specs["vae_decoder"], BuildOptions(), MODEL) == {"latent": ((1, 4, 64, 64),) * 3}
    assert profile_shapes(specs["vae_encoder"], BuildOptions(), MODEL) == {"image": ((1, 3, 512, 512),) * 3}


def test_static_profile_follows_size_batch_and_guidance(specs):
    opts = BuildOptions(height=(768, 768), width=(512, 512), batch=(3, 3))
    assert profile_shapes(specs["unet"], opts, MODEL)["sample"] == ((6, 4, 96, 64),) * 3
    assert profile_shapes(specs["vae_decoder"], opts, MODEL)["latent"] == ((3, 4, 96, 64),) * 3
    assert profile_shapes(specs["vae_encoder"], opts, MODEL)["image"] == ((1, 3, 768, 512),) * 3  # one init image
    no_cfg = dataclasses.replace(opts, guidance=False)
    assert profile_shapes(specs["unet"], no_cfg, MODEL)["sample"] == ((3, 4, 96, 64),) * 3
    assert profile_shapes(specs["text_encoder"], no_cfg, MODEL)["input_ids"] == ((3, 77),) * 3


def test_every_profile_spans_the_prompt_chunks(specs):
    """Long prompts lengthen the UNet's text sequence (77 per chunk): static and dynamic plans both take 1 to 3."""
    for opts in (BuildOptions(), BuildOptions(profile="dynamic")):
        lo, _, hi = profile_shapes(specs["unet"], opts, MODEL)["encoder_hidden_states"]
        assert (lo[1], hi[1]) == (77, 3 * 77)
    assert profile_shapes(specs["unet"], BuildOptions(), MODEL)["encoder_hidden_states"][1] == (2, 77, 768)


def test_dynamic_profile_is_the_spec_ranges(specs):
    for name in ("text_encoder", "unet", "vae_encoder", "vae_decoder"):
        spec, prof = specs[name], profile_shapes(specs[name], BuildOptions(profile="dynamic"), MODEL)
        for which in ("min", "max"):
            dims = {d: getattr(r, which) for d, r in spec.dim_ranges.items()}
            assert shapes(prof, which) == {t.name: spec.shape(t, dims) for t in spec.inputs}
    unet = profile_shapes(specs["unet"], BuildOptions(profile="dynamic"), MODEL)
    assert unet["sample"] == ((1, 4, 32, 32), (2, 4, 64, 64), (8, 4, 128, 128))


def test_dynamic_profile_narrowed_by_user_ranges(specs):
    opts = BuildOptions(profile="dynamic", height=(512, 768), width=(512, 512), batch=(1, 2))
    assert profile_shapes(specs["unet"], opts, MODEL)["sample"] == ((2, 4, 64, 64), (2, 4, 64, 64), (4, 4, 96, 64))
    assert profile_shapes(specs["vae_decoder"], opts, MODEL)["latent"] == (
        (1, 4, 64, 64), (1, 4, 64, 64), (2, 4, 96, 64),
    )  # fmt: skip
    assert profile_shapes(specs["text_encoder"], opts, MODEL)["input_ids"] == ((2, 77), (2, 77), (4, 77))


def test_upscaler_profile_spans_its_tile_range_whatever_the_image(specs):
    spec = specs["upscaler"]
    for opts in (BuildOptions(), BuildOptions(height=(768, 768), batch=(2, 2)), BuildOptions(profile="dynamic")):
        assert profile_shapes(spec, opts, MODEL) == {"image": ((1, 3, 16, 16), (1, 3, 256, 256), (4, 3, 1024, 1024))}


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(height=(256, 512)), ["--profile static", "--profile dynamic"]),
        (dict(height=(500, 500)), ["--height 500", "multiple of 64"]),
        (dict(width=(2048, 2048)), ["--width 2048 is outside", "[256, 1024]", "--image-range"]),
        (dict(profile="dynamic", batch=(1, 5)), ["--batch 1-5", "unet batch of 2-10", "fewer images"]),
        (dict(batch=(5, 5)), ["--batch 5 images means a unet batch of 10", "[1, 8]"]),
        (dict(opt_level=7), ["--opt-level", "0-5"]),
        (dict(workspace_gb=0), ["--workspace", "positive"]),
        (dict(batch=(0, 0)), ["--batch", "positive"]),
    ],
)
def test_bad_build_options_say_what_to_change(specs, kwargs, words):
    with pytest.raises(BadInput) as e:
        profile_shapes(specs["unet"], BuildOptions(**kwargs), MODEL)
    assert all(w in str(e.value) for w in words), str(e.value)
    assert "\n" not in str(e.value)


# ---- cache keys -------------------------------------------------------------------------------------------


def tiny_onnx(path: Path, value: float = 1.0, external: bool = False) -> Path:
    """A real ONNX graph y = x + w; `external` stores w in `<name>.data` as the exporter does above 2 GB."""
    w = numpy_helper.from_array(np.full((4, 4), value, np.float32), "w")
    node = helper.make_node("Add", ["x", "w"], ["y"])
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4, 4]) for n in ("x", "y")]
    model = helper.make_model(helper.make_graph([node], "g", io[:1], io[1:], [w]))
    kw = dict(save_as_external_data=True, location=path.name + ".data", size_threshold=0) if external else {}
    onnx.save_model(model, str(path), **kw)
    return path


def ingredients(specs, env=ENV, options=BuildOptions(), sha=None, profile_options=None):
    sha = sha or {n: f"sha-{n}" for n in specs}
    profs = {n: profile_shapes(specs[n], profile_options or options, MODEL) for n in specs}
    return tb.plan_ingredients(env, options, {n: (sha[n], profs[n]) for n in specs})


def test_onnx_hash_covers_graph_bytes_and_external_data(tmp_path):
    a = tb.onnx_sha256(tiny_onnx(tmp_path / "a.onnx"))
    (tmp_path / "copy").mkdir()
    assert a == tb.onnx_sha256(tiny_onnx(tmp_path / "copy" / "a.onnx"))  # content, not location
    assert tb.onnx_sha256(tiny_onnx(tmp_path / "a.onnx", value=2.0)) != a
    ext = tiny_onnx(tmp_path / "e.onnx", external=True)
    before = tb.onnx_sha256(ext)
    data = ext.with_name("e.onnx.data")
    raw = bytearray(data.read_bytes())
    raw[0] ^= 1
    data.write_bytes(bytes(raw))
    assert tb.onnx_sha256(ext) != before  # same .onnx bytes, different weights


def test_same_ingredients_same_key_in_any_order(specs):
    a = ingredients(specs)
    b = ingredients(dict(reversed(list(specs.items()))))
    assert tb.plan_key(a) == tb.plan_key(b)
    assert re.fullmatch(r"[0-9a-f]{16}", tb.plan_key(a))


def test_every_ingredient_changes_the_key(specs, tmp_path):
    base = tb.plan_key(ingredients(specs))
    onnx_a, onnx_b = tiny_onnx(tmp_path / "a.onnx"), tiny_onnx(tmp_path / "b.onnx", value=1.5)
    changed = {
        "onnx bytes": ingredients(specs, sha={**{n: f"sha-{n}" for n in specs}, "unet": tb.onnx_sha256(onnx_b)}),
        "tensorrt version": ingredients(specs, env=dataclasses.replace(ENV, tensorrt="11.4.1.2")),
        "gpu name": ingredients(specs, env=dataclasses.replace(ENV, gpu="NVIDIA H200")),
        "compute capability": ingredients(specs, env=dataclasses.replace(ENV, compute_capability="10.0")),
        "profile shapes": ingredients(specs, profile_options=BuildOptions(height=(768, 768))),
    }
    assert tb.onnx_sha256(onnx_a) != tb.onnx_sha256(onnx_b)
    alternatives = dict(profile="dynamic", height=(768, 768), width=(768, 768), batch=(2, 2), guidance=False,
                        opt_level=5, workspace_gb=2.0)  # fmt: skip
    assert set(alternatives) == {f.name for f in dataclasses.fields(BuildOptions)}  # a new option needs a case
    for name, value in alternatives.items():  # profile held fixed: the option alone must move the key
        opts = dataclasses.replace(BuildOptions(), **{name: value})
        changed[f"option {name}"] = ingredients(specs, options=opts, profile_options=BuildOptions())
    keys = {what: tb.plan_key(ing) for what, ing in changed.items()}
    assert all(k != base for k in keys.values()), keys
    assert len(set(keys.values())) == len(keys)


# ---- plan records: reuse, refusal, choice -----------------------------------------------------------------


def write_plans(bundle: Path, ing: dict, names=None, edit=None) -> Path:
    d = bundle / "trt" / tb.plan_key(ing)
    d.mkdir(parents=True, exist_ok=True)
    (d / "key.json").write_text(json.dumps(edit or ing))
    for n in names if names is not None else ing["components"]:
        (d / f"{n}.plan").write_bytes(b"plan bytes for " + n.encode())
    return d


def test_reuse_decision(specs, tmp_path):
    ing = ingredients(specs)
    source, why = reuse_decision(tb.read_plan_records(tmp_path), ing, "unet")
    assert source is None and why.startswith("building: no plan")
    old = write_plans(tmp_path, ing, names=["unet", "text_encoder"])
    records = tb.read_plan_records(tmp_path)
    source, why = reuse_decision(records, ing, "unet")
    assert source == old / "unet.plan" and why.startswith("reusing plan: same ONNX")
    assert reuse_decision(records, ing, "vae_decoder")[0] is None  # its build did not finish
    # Re-exported UNet: it rebuilds, the unchanged text encoder's plan is reused from the old key.
    ing2 = ingredients(specs, sha={**{n: f"sha-{n}" for n in specs}, "unet": "sha-new"})
    assert reuse_decision(records, ing2, "unet")[0] is None
    source, why = reuse_decision(records, ing2, "text_encoder")
    assert source == old / "text_encoder.plan" and f"reusing plan from trt/{old.name}" in why
    # Other options, GPU or TensorRT: nothing is reused.
    for other in (ingredients(specs, options=BuildOptions(opt_level=5)),
                  ingredients(specs, env=dataclasses.replace(ENV, gpu="NVIDIA L40S"))):  # fmt: skip
        assert reuse_decision(records, other, "text_encoder")[0] is None


def test_timing_cache_seeded_only_from_the_same_tensorrt_and_gpu(specs, tmp_path):
    d = write_plans(tmp_path, ingredients(specs, options=BuildOptions(height=(768, 768))))
    assert timing_seed(tb.read_plan_records(tmp_path), ENV) is None  # no cache written there
    (d / "timing.cache").write_bytes(b"tactic timings")
    records = tb.read_plan_records(tmp_path)
    assert timing_seed(records, ENV) == d / "timing.cache"  # other shapes, same GPU: timings still apply
    assert timing_seed(records, dataclasses.replace(ENV, gpu="NVIDIA L4")) is None
    assert timing_seed(records, dataclasses.replace(ENV, tensorrt="10.8.0.43")) is None


def test_edited_key_json_is_neither_reused_nor_loaded(specs, tmp_path):
    ing = ingredients(specs)
    edited = {**ing, "options": {**ing["options"], "opt_level": 0}}
    write_plans(tmp_path, ing, edit=edited)
    records = tb.read_plan_records(tmp_path)
    assert not records[0].key_matches
    assert reuse_decision(records, edited, "unet")[0] is None
    assert "does not match its key" in tb.stale_reason(records[0], ENV, "unet", "sha-unet")


def test_stale_reasons_name_the_difference(specs, tmp_path):
    write_plans(tmp_path, ingredients(specs), names=["unet"])
    record = tb.read_plan_records(tmp_path)[0]
    assert tb.stale_reason(record, ENV, "unet", "sha-unet") is None
    cases = [
        (
            dataclasses.replace(ENV, tensorrt="10.8.0.43"),
            "unet",
            "sha-unet",
            "TensorRT 11.4.0.106, this is TensorRT 10.8",
        ),
        (Environment(ENV.tensorrt, "NVIDIA A100", "8.0"), "unet", "sha-unet", "this GPU is NVIDIA A100 (compute 8.0)"),
        (ENV, "unet", "sha-other", "the unet ONNX graph changed since the plan was built"),
        (ENV, "vae_decoder", "sha-vae_decoder", "vae_decoder.plan is missing"),
    ]
    for env, name, sha, words in cases:
        assert words in tb.stale_reason(record, env, name, sha)


def test_runtime_refuses_stale_plans_with_a_rebuild_hint(specs, tmp_path):
    with pytest.raises(BadInput, match=r"has no TensorRT plans; build them with `diffrt build .*`"):
        tb.select_plans(tmp_path, ENV, "unet", "sha-unet")
    opts = BuildOptions(height=(768, 768), batch=(2, 2))
    write_plans(tmp_path, ingredients(specs, options=opts))
    newer = Environment("11.5.0.1", ENV.gpu, ENV.compute_capability)
    with pytest.raises(BadInput) as e:
        tb.select_plans(tmp_path, newer, "unet", "sha-unet")
    msg = str(e.value)
    assert "built with TensorRT 11.4.0.106, this is TensorRT 11.5.0.1" in msg and "\n" not in msg
    assert f"rebuild with `diffrt build {tmp_path} --height 768 --batch 2`" in msg
    assert [r.dir.name for r in tb.select_plans(tmp_path, ENV, "unet", "sha-unet")] == [tb.plan_key(
        ingredients(specs, options=opts))]  # fmt: skip


def test_choose_plan_by_coverage(specs, tmp_path):
    static = write_plans(tmp_path, ingredients(specs))
    dynamic = write_plans(tmp_path, ingredients(specs, options=BuildOptions(profile="dynamic")))
    records = tb.read_plan_records(tmp_path)

    def request(batch, side):
        return {"sample": (batch, 4, side, side), "timestep": (batch,), "encoder_hidden_states": (batch, 77, 768)}

    assert tb.choose_plan(records, "unet", request(2, 64)).dir == static  # exact opt beats a range
    assert tb.choose_plan(records, "unet", request(2, 96)).dir == dynamic
    assert tb.choose_plan(records, "unet", request(1, 64)).dir == dynamic
    assert tb.choose_plan(records, "unet", request(2, 256)) is None
    assert not tb.covers(records[0].profile("unet"), {"sample": (2, 4, 64)})  # wrong rank


def test_build_command_round_trips_through_the_cli():
    parser = argparse.ArgumentParser()
    add_build_parser(parser.add_subparsers())
    for opts in (
        BuildOptions(),
        BuildOptions(height=(768, 768), width=(512, 512), batch=(2, 2), opt_level=5),
        BuildOptions(profile="dynamic", height=(256, 768), batch=(1, 4), guidance=False, workspace_gb=6.5),
    ):
        line = tb.build_command("b", opts)
        assert line.startswith("diffrt build b")
        assert options_from_args(parser.parse_args(line.split()[1:])) == opts, line


def test_cli_parses_spans_and_rejects_garbage():
    parser = argparse.ArgumentParser()
    add_build_parser(parser.add_subparsers())
    args = parser.parse_args(["build", "b", "--batch", "1-4", "--height", "640", "--profile", "dynamic"])
    assert (args.batch, args.height, args.width) == ((1, 4), (640, 640), None)
    with pytest.raises(SystemExit):
        parser.parse_args(["build", "b", "--batch", "four"])


# ---- errors people hit ------------------------------------------------------------------------------------


def fake_bundle(root: Path, specs) -> tuple[Path, Manifest]:
    """A bundle directory that passes `load_manifest` (graphs are tiny real ONNX files, not SD networks)."""
    files = {n: {"fp16": f"onnx/{n}.fp16.onnx", "fp32": f"onnx/{n}.fp32.onnx"} for n in specs}
    manifest = Manifest(MODEL, TokenizerInfo(77, 49406, 49407, 49407), {}, {
        n: ComponentEntry(specs[n], files[n]) for n in specs})  # fmt: skip
    (root / "onnx").mkdir(parents=True)
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "tokenizer.json").write_text("{}")
    for f in files.values():
        for rel in f.values():
            tiny_onnx(root / rel)
    manifest.save(root)
    return root, manifest


def test_available_reason_says_what_is_missing_here():
    reason = available_reason()
    if reason is None:
        pytest.skip("TensorRT, cuda-python and a GPU are all present: nothing is missing")
    assert "\n" not in reason
    if importlib.util.find_spec("tensorrt") is None:
        assert "TensorRT is not importable (ModuleNotFoundError" in reason
        assert "pip install --extra-index-url https://pypi.nvidia.com tensorrt-cu13" in reason
    if "no usable NVIDIA GPU" not in reason:
        assert "cuda-python" in reason or "TensorRT" in reason


def test_backend_and_build_refuse_without_tensorrt(specs, tmp_path):
    if available_reason() is None:
        pytest.skip("TensorRT and a GPU are present")
    bundle, manifest = fake_bundle(tmp_path / "b", specs)
    with pytest.raises(BadInput, match="backend tensorrt is unavailable: .*ort-cpu"):
        TensorRTBackend(manifest)
    from diffrt.engine.backends import make_backend

    with pytest.raises(BadInput, match="backend tensorrt is unavailable"):
        make_backend("tensorrt", manifest)
    parser = argparse.ArgumentParser()
    add_build_parser(parser.add_subparsers())
    with pytest.raises(BadInput, match="diffrt build needs TensorRT and an NVIDIA GPU: "):
        cmd_build(parser.parse_args(["build", str(bundle)]))
    with pytest.raises(BadInput, match="--profile dynamic"):  # option mistakes are reported first
        cmd_build(parser.parse_args(["build", str(bundle), "--height", "256-512"]))
    with pytest.raises(BadInput, match="--height 300 must be a multiple of 64"):  # and size mistakes
        cmd_build(parser.parse_args(["build", str(bundle), "--height", "300"]))


def test_build_error_wording():
    msg = tb.parser_failure(
        "unet", Path("onnx/unet.fp16.onnx"), [("no importer", "Attention_3", "MultiHeadAttention", 812)]
    )
    assert "unet.fp16.onnx" in msg and "node 812 'Attention_3' (MultiHeadAttention): no importer" in msg
    assert "re-export" in msg
    msg = tb.build_failure("unet", BuildOptions(workspace_gb=8))
    assert all(w in msg for w in ("ran out of memory", "--workspace (now 8 GB)", "--batch", "--profile static"))
    assert tb.needs_strongly_typed_flag("10.8.0.43") and not tb.needs_strongly_typed_flag("11.4.0.106")


def test_bundle_root_and_request_hint(specs):
    assert bundle_root(Path("/x/bundle/onnx/unet.fp16.onnx"), "onnx/unet.fp16.onnx") == Path("/x/bundle")
    req = {"sample": (2, 4, 96, 64), "timestep": (2,), "encoder_hidden_states": (2, 77, 768)}
    assert request_hint(Path("b"), specs["unet"], req, 8) == "diffrt build b --height 768 --width 512 --batch N"


# ---- API surface, derived from the real packages -----------------------------------------------------------

ROLES = {  # variable name in diffrt's TensorRT code -> the TensorRT class it holds
    "builder": "Builder",
    "network": "INetworkDefinition",
    "parser": "OnnxParser",
    "parser_error": "ParserError",
    "config": "IBuilderConfig",
    "opt_profile": "IOptimizationProfile",
    "timing_cache": "ITimingCache",
    "trt_runtime": "Runtime",
    "engine": "ICudaEngine",
    "context": "IExecutionContext",
}


def used_names(path: Path) -> dict[str, set]:
    """`trt.X.Y` chains, `cudart.X.Y` chains and methods on role variables (`engine.X`, `self.context.X`)."""
    out = {"trt": set(), "cudart": set(), "roles": set()}
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Attribute):
            continue
        chain, base = [node.attr], node.value
        while isinstance(base, ast.Attribute):
            chain.insert(0, base.attr)
            base = base.value
        if isinstance(base, ast.Name) and base.id in ("trt", "cudart"):
            out[base.id].add(tuple(chain))
        owner = node.value
        role = owner.id if isinstance(owner, ast.Name) else owner.attr if isinstance(owner, ast.Attribute) else None
        if role in ROLES:
            out["roles"].add((role, node.attr))
    return out


@pytest.fixture(scope="module")
def trt_identifiers(request) -> set[str]:
    """Identifiers in the TensorRT 11 bindings wheel: its extension module's strings and its Python files."""
    cache = Path(request.config.cache.mkdir("diffrt-tensorrt-bindings"))
    wheels = sorted(cache.glob("tensorrt_cu13_bindings-*.whl"))
    if not wheels:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            TRT_BINDINGS,
            "-d",
            str(cache),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        wheels = sorted(cache.glob("tensorrt_cu13_bindings-*.whl"))
        if done.returncode or not wheels:
            pytest.skip(f"could not download {TRT_BINDINGS} to read TensorRT's names: {done.stderr.strip()[-300:]}")
    names: set[str] = set()
    with zipfile.ZipFile(wheels[-1]) as z:
        for info in z.infolist():
            if info.filename.endswith(".so"):
                names |= {m.decode() for m in re.findall(rb"[A-Za-z_][A-Za-z0-9_]*", z.read(info))}
            elif info.filename.endswith(".py"):
                names |= set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", z.read(info).decode()))
    assert "execute_async_v3" in names, "the wheel's extension module was not read"
    return names


def collected() -> dict[str, set]:
    merged = {"trt": set(), "cudart": set(), "roles": set()}
    for f in ("trt_build.py", "trt.py", "trt_env.py"):
        for k, v in used_names(ENGINE / f).items():
            merged[k] |= v
    return merged


def test_collector_sees_the_tensorrt_code():
    used = collected()  # guards against a collector that silently finds nothing
    assert ("ExecutionContextAllocationStrategy", "USER_MANAGED") in used["trt"]
    assert ("context", "execute_async_v3") in used["roles"] and ("builder", "create_network") in used["roles"]
    assert ("cudaGraphLaunch",) in used["cudart"] and len(used["trt"]) + len(used["roles"]) > 30


def test_tensorrt_names_exist_in_the_tensorrt_11_bindings(trt_identifiers):
    used = collected()
    missing = sorted(".".join(c) for c in used["trt"] if not all(part in trt_identifiers for part in c))
    assert not missing, f"not in {TRT_BINDINGS}: {missing}"
    missing = sorted(f"{role}.{attr}" for role, attr in used["roles"] if attr not in trt_identifiers)
    assert not missing, f"methods not in {TRT_BINDINGS}: {missing}"
    assert {ROLES[role] for role, _ in used["roles"]} <= trt_identifiers


def test_cudart_names_exist_in_cuda_bindings():
    cudart = pytest.importorskip("cuda.bindings.runtime", reason="cuda-bindings (cuda-python 13) is not installed")
    missing = []
    for chain in collected()["cudart"]:
        obj = cudart
        for part in chain:
            if not hasattr(obj, part):
                missing.append(".".join(chain))
                break
            obj = getattr(obj, part)
    assert not missing, f"not in cuda.bindings.runtime: {sorted(missing)}"
