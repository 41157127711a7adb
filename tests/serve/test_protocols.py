"""OpenAI's Images API and A1111's API, driven by their real clients (the `openai` SDK, `webuiapi`) and by the
request sequences Open WebUI and SillyTavern send, against a live `diffrt serve` on 127.0.0.1 with two bundles.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
webuiapi = pytest.importorskip("webuiapi")

from PIL import Image  # noqa: E402

from diffrt.engine.pipeline import Pipeline  # noqa: E402
from diffrt.serve.app import ServeSettings, create_app  # noqa: E402
from tests.serve.live import LiveServer  # noqa: E402
from tests.serve.test_serve import GatedPipeline, metric  # noqa: E402

KEY = "test-key-123"


@pytest.fixture(scope="module")
def served(sd1_bundle, lcm_bundle):
    pipe = Pipeline.load(sd1_bundle, backend="ort-cpu", threads=2)
    gated = GatedPipeline(pipe)

    def load(path):
        return gated if path == str(sd1_bundle) else Pipeline.load(path, backend="ort-cpu", threads=2)

    settings = ServeSettings(
        str(sd1_bundle), others=(str(lcm_bundle),), max_batch=4, batch_wait_ms=5, max_queue=2, timeout_s=60
    )
    live = LiveServer(create_app(settings, loader=load))
    live.gated = gated
    yield live
    live.stop()


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def picture(size=(64, 64)) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def client(served, **kw):
    return openai.OpenAI(base_url=f"{served.base}/v1", api_key="unused", **kw)


FAST = {"num_inference_steps": 3, "scheduler": "euler", "seed": 5}


def test_openai_sdk_generate_both_formats_and_edits(served):
    c = client(served)
    r = c.images.generate(model="dall-e-3", prompt="a red fox", n=2, size="64x64", extra_body=FAST)
    assert len(r.data) == 2 and r.size == "64x64"
    first = Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json)))
    second = Image.open(io.BytesIO(base64.b64decode(r.data[1].b64_json)))
    assert first.size == (64, 64) and "Seed: 5" in first.info["parameters"] and "Seed: 6" in second.info["parameters"]

    u = c.images.generate(prompt="a red fox", size="64x64", response_format="url", extra_body=FAST)
    got = httpx.get(u.data[0].url)
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(got.content))), np.asarray(first))  # same seed, same image
    assert httpx.get(f"{served.base}/v1/images/files/nope").status_code == 404

    # edit with a mask: transparent = repaint; outside the mask the original is pasted back
    src = picture()
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 32, 64))
    e = c.images.edit(
        image=("in.png", png_bytes(src)), mask=("m.png", png_bytes(mask)), prompt="a cat", extra_body=FAST
    )
    out = np.asarray(Image.open(io.BytesIO(base64.b64decode(e.data[0].b64_json))).convert("RGB")).astype(int)
    src_a = np.asarray(src).astype(int)
    assert np.abs(out[:, 48:] - src_a[:, 48:]).max() <= 1  # kept (beyond the blur)
    assert np.abs(out[:, :16] - src_a[:, :16]).mean() > 10  # repainted
    assert "Denoising strength" in Image.open(io.BytesIO(base64.b64decode(e.data[0].b64_json))).info["parameters"]

    # edit without a mask: image to image of the whole picture, as JPEG
    e = c.images.edit(image=("in.png", png_bytes(src)), prompt="a cat", output_format="jpeg", extra_body=FAST)
    assert Image.open(io.BytesIO(base64.b64decode(e.data[0].b64_json))).format == "JPEG"

    models = [m.id for m in c.models.list()]
    assert models == [m["model_name"] for m in httpx.get(f"{served.base}/sdapi/v1/sd-models").json()]
    assert len(models) == 2


def test_openai_sdk_errors_422_404_and_429_retried(served):
    c = client(served, max_retries=0)
    with pytest.raises(openai.UnprocessableEntityError) as e:
        c.images.generate(prompt="x", size="64by64")
    assert e.value.body["param"] == "size" and "WIDTHxHEIGHT" in e.value.body["message"]
    with pytest.raises(openai.UnprocessableEntityError):
        c.images.generate(prompt="x", size="8192x8192")  # outside the bundle's range
    with pytest.raises(openai.NotFoundError) as e:
        c.images.generate(prompt="x", model="no-such-model")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.UnprocessableEntityError) as e:
        c.images.edit(image=("x.png", b"not an image"), prompt="x")
    assert e.value.body["param"] == "image"

    # the queue full: the SDK sees 429 + Retry-After and retries by itself
    gated, before = served.gated, _count(served, 429)
    gated.hold()
    hold = [threading.Thread(target=_post, args=(served, f"held {i}")) for i in range(3)]
    hold[0].start()
    assert gated.entered.wait(10)
    for t in hold[1:]:
        t.start()
    _wait(lambda: metric(httpx.get(f"{served.base}/metrics").text, "diffrt_queue_depth") == 2, "a full queue")
    threading.Thread(target=lambda: (_wait(lambda: _count(served, 429) > before, "a 429"), gated.gate.set())).start()
    r = client(served, max_retries=3).images.generate(prompt="retried", size="64x64", extra_body=FAST)
    assert len(r.data) == 1 and _count(served, 429) > before
    for t in hold:
        t.join(30)


def _count(served, code: int) -> float:
    return metric(httpx.get(f"{served.base}/metrics").text, f'diffrt_requests_total{{code="{code}"}}')


def _post(served, prompt: str) -> None:
    httpx.post(f"{served.base}/v1/images", json={"prompt": prompt, **FAST}, timeout=60)


def _wait(cond, what: str, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_webuiapi_txt2img_img2img_models_and_set_model(served):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=served.port)
    titles = [m["title"] for m in api.get_sd_models()]
    assert len(titles) == 2 and all("/" not in m["filename"] for m in api.get_sd_models())
    r = api.txt2img(prompt="a red fox", width=64, height=64, steps=3, sampler_name="DPM++ 2M", scheduler="Karras")
    assert r.image.size == (64, 64) and 0 <= r.info["seed"] < 2**32  # -1: drawn, reported
    assert r.info["all_seeds"] == [r.info["seed"]] and "Sampler: DPM++ 2M Karras" in r.info["infotexts"][0]
    again = api.txt2img(prompt="a red fox", width=64, height=64, steps=3, seed=r.info["seed"], sampler_name="Euler")
    assert "Sampler: Euler," in again.info["infotexts"][0]

    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    i = api.img2img(images=[picture()], mask_image=mask, prompt="a cat", width=64, height=64, steps=4, seed=3)
    assert i.image.size == (64, 64) and "Denoising strength: 0.75" in i.info["infotexts"][0]

    lcm, lcm_name = titles[1], api.get_sd_models()[1]["model_name"]
    api.util_set_model(lcm)
    assert api.get_options()["sd_model_checkpoint"] == lcm
    r = api.txt2img(prompt="a red fox", width=64, height=64, steps=2, cfg_scale=1, sampler_name="LCM")
    assert r.info["sd_model_name"] == lcm_name and "Sampler: LCM" in r.info["infotexts"][0]
    api.util_set_model(titles[0])
    with pytest.raises(RuntimeError, match="422"):
        api.txt2img(prompt="x", width=64, height=64, steps=3, restore_faces=True)


def test_open_webui_sequences(served):
    """What Open WebUI sends: A1111 engine (Basic auth even when empty, base URL ending in "/"), OpenAI engine."""
    b, auth = served.base + "/", {"authorization": "Basic"}  # empty credentials, as Open WebUI sends by default
    options = httpx.get(f"{b}/sdapi/v1/options", headers=auth).json()
    models = httpx.get(f"{b}/sdapi/v1/sd-models", headers=auth).json()
    assert options["sd_model_checkpoint"] == models[0]["title"]
    r = httpx.post(f"{b}/sdapi/v1/options", headers=auth, json={**options, "sd_model_checkpoint": models[0]["title"]})
    assert r.status_code == 200
    r = httpx.post(
        f"{b}/sdapi/v1/txt2img",
        headers=auth,
        json={"prompt": "a cat", "batch_size": 2, "width": 64, "height": 64, "steps": 5, "negative_prompt": "blurry"},
        timeout=60,
    )
    body = r.json()
    assert r.status_code == 200 and len(body["images"]) == 2 and json.loads(body["info"])["negative_prompt"] == "blurry"

    bearer = {"Authorization": "Bearer sk-anything"}
    j = {"model": "dall-e-2", "prompt": "a cat", "n": 1, "size": "64x64", "response_format": "b64_json"}
    r = httpx.post(f"{served.base}/v1/images/generations", headers=bearer, json=j, timeout=60)
    assert r.status_code == 200 and Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"])))
    files = [("image[]", ("a.png", png_bytes(picture()), "image/png"))]
    form = {"model": "", "prompt": "a cat", "n": "1", "size": "64x64", "response_format": "b64_json"}
    r = httpx.post(f"{served.base}/v1/images/edits", headers=bearer, data=form, files=files, timeout=60)
    assert r.status_code == 200, r.text
    assert len(r.json()["data"]) == 1


def test_sillytavern_sequence(served):
    b, auth = served.base, {"Authorization": "Basic " + base64.b64encode(b":").decode()}
    a = f"{b}/sdapi/v1"
    assert httpx.get(f"{a}/options", headers=auth).status_code == 200
    samplers = [s["name"] for s in httpx.get(f"{a}/samplers", headers=auth).json()]
    assert "DDIM" in samplers and "Euler a" in samplers
    title = httpx.get(f"{a}/options", headers=auth).json()["sd_model_checkpoint"]
    assert title in [m["title"] for m in httpx.get(f"{a}/sd-models", headers=auth).json()]
    upscalers = [u["name"] for u in httpx.get(f"{a}/upscalers", headers=auth).json()]
    latent = [u["name"] for u in httpx.get(f"{a}/latent-upscale-modes", headers=auth).json()]
    assert upscalers[0] == "None" and "Latent" in latent
    assert "normal" in [s["name"] for s in httpx.get(f"{a}/schedulers", headers=auth).json()]
    assert httpx.get(f"{a}/sd-vae", headers=auth).json() == []
    assert httpx.post(f"{a}/options", headers=auth, json={"sd_model_checkpoint": title}).status_code == 200
    p = httpx.get(f"{a}/progress", headers=auth).json()
    assert p["progress"] == 0.0 and p["state"]["job_count"] == 0
    body = {
        "url": b,
        "auth": "",
        "prompt": "best quality, a cat",
        "negative_prompt": "lowres",
        "sampler_name": "DDIM",
        "scheduler": "normal",
        "steps": 4,
        "cfg_scale": 7,
        "width": 64,
        "height": 64,
        "restore_faces": False,
        "enable_hr": False,
        "hr_upscaler": "Latent",
        "hr_scale": 1,
        "denoising_strength": 0.7,
        "hr_second_pass_steps": 0,
        "override_settings": {"CLIP_stop_at_last_layers": 2},
        "override_settings_restore_afterwards": True,
        "clip_skip": 1,
        "save_images": True,
        "send_images": True,
        "do_not_save_grid": False,
        "do_not_save_samples": False,
    }
    r = httpx.post(f"{a}/txt2img", headers=auth, json=body, timeout=60)
    assert r.status_code == 200, r.text
    im = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    assert im.size == (64, 64) and "Sampler: DDIM" in im.info["parameters"]
    assert "Clip skip: 2" in im.info["parameters"]  # the user's setting, sent per request


def test_progress_preview_and_interrupt(served):
    a, result = f"{served.base}/sdapi/v1", {}
    long = {"prompt": "slow", "width": 64, "height": 64, "steps": 150, "sampler_name": "Euler"}
    t = threading.Thread(target=lambda: result.update(r=httpx.post(f"{a}/txt2img", json=long, timeout=120)))
    t.start()
    seen = {}

    def stepping():
        p = httpx.get(f"{a}/progress").json()
        if p["state"]["sampling_step"] > 0 and p["current_image"]:
            seen.update(p)
            return True
        return False

    _wait(stepping, "a step and a preview")
    assert 0 < seen["progress"] < 1 and seen["state"]["sampling_steps"] == 150 and seen["state"]["job_count"] >= 1
    assert Image.open(io.BytesIO(base64.b64decode(seen["current_image"]))).size == (8, 8)
    assert httpx.post(f"{a}/interrupt").json() == {"interrupted": True}
    t.join(60)
    r = result["r"]
    assert r.status_code == 409 and "interrupted" in r.json()["detail"]
    assert httpx.get(f"{a}/progress").json()["state"]["job_count"] == 0
    assert httpx.post(f"{a}/interrupt").json() == {"interrupted": False}  # nothing runs


def test_burst_gets_only_200_and_429_and_bodies_are_capped(served):
    codes: list[int] = []

    def one(i):
        body = {"prompt": f"burst {i}", "size": "64x64", **FAST}
        codes.append(httpx.post(f"{served.base}/v1/images/generations", json=body, timeout=60).status_code)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert set(codes) <= {200, 429} and 200 in codes
    big = {"prompt": "x", "image": "A" * (17 * 2**20)}
    r = httpx.post(f"{served.base}/sdapi/v1/img2img", json=big, timeout=60)
    assert r.status_code == 413
    files = [("image", ("a.png", b"0" * (17 * 2**20), "image/png"))]
    r = httpx.post(f"{served.base}/v1/images/edits", data={"prompt": "x"}, files=files, timeout=60)
    assert r.status_code == 413 and "over" in r.json()["error"]["message"]


def test_api_key_in_constant_time_for_every_route_but_health(sd1_bundle):
    pipe = Pipeline.load(sd1_bundle, backend="ort-cpu", threads=2)
    live = LiveServer(create_app(ServeSettings(str(sd1_bundle), api_key=KEY), loader=lambda path: pipe))
    try:
        b = live.base
        assert httpx.get(f"{b}/healthz").status_code == 200
        r = httpx.post(f"{b}/v1/images/generations", json={"prompt": "x"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{b}/sdapi/v1/options", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(f"{b}/sdapi/v1/options", auth=("user", KEY)).status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{b}/v1", api_key="wrong", max_retries=0).models.list()
        c = openai.OpenAI(base_url=f"{b}/v1", api_key=KEY)
        r = c.images.generate(prompt="x", size="64x64", response_format="url", extra_body=FAST)
        assert httpx.get(r.data[0].url).status_code == 200  # the link itself is the secret
        api = webuiapi.WebUIApi(host="127.0.0.1", port=live.port)
        api.set_auth("any", KEY)
        assert api.txt2img(prompt="x", width=64, height=64, steps=2).image.size == (64, 64)
    finally:
        live.stop()


def test_timeouts_are_504_in_each_protocols_shape(sd1_bundle):
    gated = GatedPipeline(Pipeline.load(sd1_bundle, backend="ort-cpu", threads=2))
    live = LiveServer(create_app(ServeSettings(str(sd1_bundle), timeout_s=0.5), loader=lambda path: gated))
    try:
        gated.hold()  # every engine call now waits past the timeout
        b = live.base
        c = openai.OpenAI(base_url=f"{b}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.APIStatusError) as e:
            c.images.generate(prompt="slow", size="64x64", extra_body=FAST)
        assert e.value.status_code == 504 and e.value.body["code"] == "timeout"
        r = httpx.post(f"{b}/sdapi/v1/txt2img", json={"prompt": "slow", "steps": 2}, timeout=30)
        assert r.status_code == 504 and "within 0.5 s" in r.json()["detail"]
        edit = [("image", ("a.png", png_bytes(picture()), "image/png"))]
        r = httpx.post(f"{b}/v1/images/edits", data={"prompt": "slow"}, files=edit, timeout=30)
        assert r.status_code == 504 and r.json()["error"]["type"] == "server_error"
        gated.gate.set()
        assert httpx.get(f"{b}/readyz").status_code == 200  # still serving
        r = httpx.post(f"{b}/sdapi/v1/txt2img", json={"prompt": "after", "steps": 2, "width": 64, "height": 64})
        assert r.status_code == 200
    finally:
        gated.gate.set()
        live.stop()
