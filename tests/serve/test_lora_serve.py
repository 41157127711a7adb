"""LoRAs through the live service: by name from --lora-dir in diffrt's JSON and as A1111 prompt tags from
`webuiapi`, never a path a client names; requests with different LoRA sets never share an engine call."""

from __future__ import annotations

import base64
import io
import threading

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
webuiapi = pytest.importorskip("webuiapi")

from PIL import Image  # noqa: E402

from diffrt.engine.pipeline import Pipeline  # noqa: E402
from diffrt.serve.app import ServeSettings, create_app  # noqa: E402
from tests.builders.lora import build_lora  # noqa: E402
from tests.serve.live import LiveServer  # noqa: E402
from tests.serve.test_serve import GatedPipeline, metric  # noqa: E402

FAST = {"num_inference_steps": 3, "scheduler": "euler", "width": 64, "height": 64, "upscale": False}


@pytest.fixture(scope="module")
def served(sd1_bundle, sd1_folder, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora-dir")
    build_lora(folder / "style.safetensors", sd1_folder, "kohya", seed=1)
    build_lora(folder / "other.safetensors", sd1_folder, "peft", seed=2)
    (tmp_path_factory.mktemp("outside") / "secret.safetensors").write_bytes(b"not for clients")
    pipe = Pipeline.load(sd1_bundle, backend="ort-cpu", threads=2, lora_dir=folder, lora_paths=False)
    gated = GatedPipeline(pipe)
    settings = ServeSettings(str(sd1_bundle), max_batch=4, batch_wait_ms=50, max_queue=16, timeout_s=120,
                             lora_dir=str(folder))  # fmt: skip
    live = LiveServer(create_app(settings, loader=lambda path: gated))
    live.gated, live.folder = gated, folder
    yield live
    live.stop()


def image_of(body: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(body["images"][0]))).convert("RGB"))


def direct(served, prompt, loras=(), seed=5, **kw) -> np.ndarray:
    out = served.gated.pipe(prompt, seed=seed, loras=loras, **{**FAST, **kw})
    return np.asarray(out.images[0])


def test_loras_by_name_and_prompt_tag_and_the_listing(served):
    style = {"name": "style", "scale": 0.8}
    body = httpx.post(f"{served.base}/v1/images", json={"prompt": "a fox", "seed": 5, "loras": [style], **FAST},
                      timeout=120).json()  # fmt: skip
    with_lora = direct(served, "a fox", [(served.folder / "style.safetensors", 0.8)])
    np.testing.assert_array_equal(image_of(body), with_lora)
    assert np.abs(with_lora.astype(int) - direct(served, "a fox")).max() > 10

    api = webuiapi.WebUIApi(host="127.0.0.1", port=served.port)
    assert sorted(x["name"] for x in api.get_loras()) == ["other", "style"]
    r = api.txt2img(prompt="a fox<lora:style:0.8>", width=64, height=64, steps=3, sampler_name="Euler", seed=5,
                    cfg_scale=7)  # fmt: skip
    want = direct(served, "a fox", [(served.folder / "style.safetensors", 0.8)], guidance_scale=7)
    np.testing.assert_array_equal(np.asarray(r.image.convert("RGB")), want)
    from diffrt.engine.lora import lora_hash

    text = r.info["infotexts"][0]  # A1111 keeps the tag in the recorded prompt and adds the file's short hash
    assert text.startswith("a fox<lora:style:0.8>\n") and r.info["prompt"] == "a fox<lora:style:0.8>"
    assert f'Lora hashes: "style: {lora_hash(served.folder / "style.safetensors")}"' in text


@pytest.mark.parametrize("name", ["../secret", "/etc/passwd", "missing", "..", "sub/../../secret"])
def test_a_lora_outside_the_folder_is_422_naming_it(served, name):
    for body in ({"prompt": "a fox", "loras": [{"name": name}]}, {"prompt": f"a fox <lora:{name}:1>"}):
        r = httpx.post(f"{served.base}/v1/images", json={**body, **FAST}, timeout=60)
        assert r.status_code == 422, r.text
        assert "not in the LoRA folder" in r.text and "\n" not in r.json()["detail"]
    bad = httpx.post(f"{served.base}/v1/images", json={"prompt": "a", "loras": [{"name": "style", "scale": -1}]})
    assert bad.status_code == 422


def test_requests_with_different_lora_sets_never_share_a_call(served):
    gated, calls = served.gated, len(served.gated.prompts)
    gated.hold()
    results: dict[str, dict] = {}

    def post(tag: str, loras: list) -> None:
        r = httpx.post(f"{served.base}/v1/images", timeout=120,
                       json={"prompt": tag, "seed": 5, "loras": loras, **FAST})  # fmt: skip
        results[tag] = r.json()

    first = threading.Thread(target=post, args=("hold", []))
    first.start()
    assert gated.entered.wait(30)
    style = [{"name": "style", "scale": 0.8}]
    threads = [threading.Thread(target=post, args=args)
               for args in (("a1", style), ("b", [{"name": "other"}]), ("a2", style))]  # fmt: skip
    for t in threads:
        t.start()
    for _ in range(200):  # all three queued behind the held call
        if metric(httpx.get(f"{served.base}/metrics").text, "diffrt_queue_depth") >= 3:
            break
        threading.Event().wait(0.05)
    gated.gate.set()
    for t in [first, *threads]:
        t.join(120)
    groups = [sorted(p) for p in gated.prompts[calls:]]
    assert ["a1", "a2"] in groups and ["b"] in groups, groups
    style = [(served.folder / "style.safetensors", 0.8)]
    np.testing.assert_array_equal(image_of(results["a2"]), direct(served, "a2", style))
    np.testing.assert_array_equal(
        image_of(results["b"]), direct(served, "b", [(served.folder / "other.safetensors", 1)])
    )
