"""`diffrt serve` on CPU with the tiny SD1 bundle: answers, validation, batching, back-pressure, metrics.

Most tests drive the ASGI app in-process (httpx.ASGITransport, lifespan run by hand); the disconnect test
needs a real socket, so it runs uvicorn on 127.0.0.1 with an ephemeral port. Slow requests are made slow by
a gate in front of the real Pipeline (deterministic, and cheap on CPU) rather than by many steps.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import socket
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from PIL import Image  # noqa: E402

from diffrt.engine.pipeline import Pipeline  # noqa: E402
from diffrt.serve.app import ServeSettings, create_app  # noqa: E402

FAST = {"num_inference_steps": 3, "scheduler": "euler"}


class GatedPipeline:
    """The real Pipeline behind a gate: while `gate` is clear, calls wait in the engine thread. Records
    every call's prompts, so a test can tell which requests reached the engine."""

    def __init__(self, pipe: Pipeline):
        self.pipe, self.gate, self.entered = pipe, threading.Event(), threading.Event()
        self.gate.set()
        self.prompts: list[list[str]] = []
        self.threads: set[str] = set()

    def hold(self) -> None:
        """Close the gate: the next engine call waits (and sets `entered`) until `gate.set()`."""
        self.entered.clear()
        self.gate.clear()

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def generate(self, request, callback=None):
        self.prompts.append(list(request.prompts))
        self.threads.add(threading.current_thread().name)
        self.entered.set()
        assert self.gate.wait(30), "test gate never opened"
        return self.pipe.generate(request, callback)


@pytest.fixture(scope="module")
def pipe(sd1_bundle):
    # Shared by every app in this module: a Pipeline may be shared between threads (calls take its lock).
    return Pipeline.load(sd1_bundle, backend="ort-cpu", threads=2)


def make_app(pipe, **kw):
    gated = GatedPipeline(pipe)
    given = {"bundle": str(pipe.bundle), "max_batch": 4, "batch_wait_ms": 5, "max_queue": 16, "timeout_s": 60, **kw}
    return create_app(ServeSettings(**given), loader=lambda path: gated), gated


async def _ready(client: httpx.AsyncClient) -> None:
    for _ in range(500):
        if (await client.get("/readyz")).status_code == 200:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("never ready")


def run_with_client(app, fn, ready: bool = True):
    """Run `await fn(client)` against the app in-process, with its lifespan (start-up, shutdown) around it."""

    async def main():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
                if ready:
                    await _ready(client)
                return await fn(client)

    return asyncio.run(main())


def decode_png(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line == name:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def _wait_for(cond, what: str, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not await cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def test_png_and_json_answers(pipe):
    app, _ = make_app(pipe)

    async def fn(c):
        r = await c.post(
            "/v1/images",
            json={"prompt": "a red fox", **FAST},
            headers={"Accept": "image/png", "X-Request-ID": "abc-123"},
        )
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert r.headers["x-request-id"] == "abc-123"
        im = decode_png(r.content)
        assert im.size == (64, 64)
        assert "Steps: 3, Sampler: Euler" in im.info["parameters"] and im.info["parameters"].startswith("a red fox")

        r = await c.post("/v1/images", json={"prompt": "a fox " * 200, "num_images": 2, "width": 48, "seed": 7, **FAST})
        assert r.status_code == 200, r.text  # over-long prompts are truncated, not refused
        body = r.json()
        assert len(r.headers["x-request-id"]) == 32
        assert len(body["images"]) == 2 and body["parameters"]["seed"] == 7
        assert body["parameters"]["scheduler"] == "euler" and body["parameters"]["width"] == 48
        for data in body["images"]:
            assert decode_png(base64.b64decode(data)).size == (48, 64)
        assert (await c.get("/healthz")).status_code == 200
        assert "x-request-id" in (await c.get("/healthz")).headers
        assert (await c.get("/openapi.json")).json()["paths"]["/v1/images"]["post"]["requestBody"]
        assert (await c.get("/docs")).status_code == 200

    run_with_client(app, fn)


BAD_REQUESTS = [  # (body, expected status, text the error must contain)
    ({}, 422, "prompt"),
    ({"prompt": ""}, 422, "prompt"),
    ({"prompt": "   "}, 422, "prompt"),
    ({"prompt": 123}, 422, "prompt"),
    ({"prompt": "x", "colour": "blue"}, 422, "colour"),
    ({"prompt": "x", "num_inference_steps": 0}, 422, "num_inference_steps"),
    ({"prompt": "x", "num_inference_steps": 151}, 422, "num_inference_steps"),
    ({"prompt": "x", "num_inference_steps": "10"}, 422, "num_inference_steps"),
    ({"prompt": "x", "guidance_scale": 31}, 422, "guidance_scale"),
    ({"prompt": "x", "guidance_scale": -1}, 422, "guidance_scale"),
    ({"prompt": "x", "scheduler": "warp_drive"}, 422, "scheduler"),
    ({"prompt": "x", "width": 65}, 422, "width"),
    ({"prompt": "x", "height": 4096}, 422, "height"),
    ({"prompt": "x", "seed": -1}, 422, "seed"),
    ({"prompt": "x", "seed": 2**63}, 422, "seed"),
    ({"prompt": "x", "num_images": 0}, 422, "num_images"),
    ({"prompt": "x", "num_images": 64}, 422, "num_images"),
    ({"prompt": "x", "upscale": "yes"}, 422, "upscale"),
    ([1, 2], 422, "body"),
]


def test_bad_requests_are_4xx_naming_the_field_and_server_keeps_serving(pipe):
    app, gated = make_app(pipe)

    async def fn(c):
        for body, status, needle in BAD_REQUESTS:
            r = await c.post("/v1/images", json=body)
            assert r.status_code == status, (body, r.text)
            assert needle in r.json()["detail"], (body, r.text)
            assert "x-request-id" in r.headers
        raw = {  # bodies json= cannot send
            b'{"prompt": "x", "guidance_scale": NaN}': (422, "guidance_scale"),
            b'{"prompt": "x", "guidance_scale": 1e999}': (422, "guidance_scale"),
            b'{"prompt": "x",': (400, "body"),
            b"not json": (400, "body"),
        }
        for data, (status, needle) in raw.items():
            r = await c.post("/v1/images", content=data, headers={"content-type": "application/json"})
            assert r.status_code == status and needle in r.json()["detail"], (data, r.text)
        big = json.dumps({"prompt": "x", "image": "A" * (16 * 2**20)}).encode()
        r = await c.post("/v1/images", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and "bytes" in r.json()["detail"]
        assert not gated.prompts  # no bad request reached the engine (the warm-up runs inside the Pipeline)
        r = await c.post("/v1/images", json={"prompt": "still fine", **FAST})
        assert r.status_code == 200 and len(r.json()["images"]) == 1
        m = (await c.get("/metrics")).text
        assert metric(m, 'diffrt_requests_total{code="422"}') == len(BAD_REQUESTS) + 2
        assert metric(m, 'diffrt_requests_total{code="400"}') == 2
        assert metric(m, 'diffrt_requests_total{code="413"}') == 1

    run_with_client(app, fn)


def test_batched_results_equal_single_results(pipe):
    app, gated = make_app(pipe, max_batch=4, batch_wait_ms=50)
    reqs = [
        {"prompt": f"prompt number {i}", "seed": 100 + i, **FAST, "guidance_scale": 5.0, "negative_prompt": "blurry"}
        for i in range(3)
    ]

    async def fn(c):
        gated.hold()  # hold the engine on a first request so the next three queue up together
        blocker = asyncio.create_task(c.post("/v1/images", json={"prompt": "blocker", **FAST}))
        await _wait_for(lambda: asyncio.to_thread(gated.entered.is_set), "the blocker to reach the engine")
        tasks = [asyncio.create_task(c.post("/v1/images", json=r, headers={"Accept": "image/png"})) for r in reqs]
        await _wait_for(lambda: _depth_is(c, 3), "three queued requests")
        gated.gate.set()
        answers = await asyncio.gather(blocker, *tasks)
        assert all(a.status_code == 200 for a in answers)
        assert [a.headers["x-batch-images"] for a in answers[1:]] == ["3", "3", "3"]
        assert gated.prompts[-1] == [r["prompt"] for r in reqs]  # one engine call for the three
        return [np.asarray(decode_png(a.content), dtype=np.int16) for a in answers[1:]]

    batched = run_with_client(app, fn)
    for r, got in zip(reqs, batched):
        alone = pipe(
            r["prompt"],
            negative_prompt="blurry",
            num_inference_steps=3,
            scheduler="euler",
            guidance_scale=5.0,
            seed=r["seed"],
        )
        want = np.asarray(alone.images[0], dtype=np.int16)
        assert np.abs(got - want).max() <= 2  # batch-size dependent kernels may differ in the last bits


def test_prompts_of_different_lengths_queue_together_but_run_apart(pipe):
    """A 75-token prompt and a 150-token one: padding the short one to two chunks would change its picture, so
    the batcher runs one call per length; each image is the one it gives alone."""
    app, gated = make_app(pipe, batch_wait_ms=50)
    long = ", ".join(f"w{i} red cat" for i in range(20))  # two chunks of the bundle's three
    reqs = [{"prompt": p, "seed": 7, **FAST, "guidance_scale": 5.0} for p in ("a cute narwhal", long, "red cat")]
    assert [len(pipe.text_encoders[0].tokenizer.chunks(r["prompt"], 3)) for r in reqs] == [1, 2, 1]

    async def fn(c):
        gated.hold()
        blocker = asyncio.create_task(c.post("/v1/images", json={"prompt": "blocker", **FAST}))
        await _wait_for(lambda: asyncio.to_thread(gated.entered.is_set), "the blocker")
        tasks = [asyncio.create_task(c.post("/v1/images", json=r, headers={"Accept": "image/png"})) for r in reqs]
        await _wait_for(lambda: _depth_is(c, 3), "three queued")
        gated.gate.set()
        answers = await asyncio.gather(blocker, *tasks)
        assert all(a.status_code == 200 for a in answers)
        assert [a.headers["x-batch-images"] for a in answers[1:]] == ["2", "1", "2"]
        assert gated.prompts[-2:] == [[reqs[0]["prompt"], reqs[2]["prompt"]], [long]]
        return [np.asarray(decode_png(a.content), dtype=np.int16) for a in answers[1:]]

    for r, got in zip(reqs, run_with_client(app, fn)):
        alone = pipe(r["prompt"], num_inference_steps=3, scheduler="euler", guidance_scale=5.0, seed=7)
        assert np.abs(got - np.asarray(alone.images[0], dtype=np.int16)).max() <= 2


async def _depth_is(c, n: int) -> bool:
    return metric((await c.get("/metrics")).text, "diffrt_queue_depth") == n


def test_stochastic_samplers_batch_and_match_single_runs(pipe):
    """Each image draws its step noise from its own seed, so euler_a requests batch like the others and give
    the images they give alone."""
    app, gated = make_app(pipe, batch_wait_ms=50)
    body = {"num_inference_steps": 2, "scheduler": "euler_a"}

    async def fn(c):
        gated.hold()
        blocker = asyncio.create_task(c.post("/v1/images", json={"prompt": "blocker", **FAST}))
        await _wait_for(lambda: asyncio.to_thread(gated.entered.is_set), "the blocker")
        tasks = [
            asyncio.create_task(
                c.post("/v1/images", json={"prompt": f"p{i}", "seed": i, **body}, headers={"Accept": "image/png"})
            )
            for i in range(2)
        ]
        await _wait_for(lambda: _depth_is(c, 2), "two queued")
        gated.gate.set()
        answers = await asyncio.gather(blocker, *tasks)
        assert [a.headers["x-batch-images"] for a in answers] == ["1", "2", "2"]
        return [np.asarray(decode_png(a.content), dtype=np.int16) for a in answers[1:]]

    batched = run_with_client(app, fn)
    for i, got in enumerate(batched):
        want = np.asarray(pipe(f"p{i}", seed=i, **body).images[0], dtype=np.int16)
        assert np.abs(got - want).max() <= 2


def test_queue_full_is_429_and_timeout_is_504(pipe):
    app, gated = make_app(pipe, max_queue=1, timeout_s=5)

    async def fn(c):
        gated.hold()
        slow = asyncio.create_task(c.post("/v1/images", json={"prompt": "slow", **FAST}))
        await _wait_for(lambda: asyncio.to_thread(gated.entered.is_set), "the slow request")
        queued = asyncio.create_task(c.post("/v1/images", json={"prompt": "queued", **FAST, "width": 48}))
        await _wait_for(lambda: _depth_is(c, 1), "one queued")
        r = await c.post("/v1/images", json={"prompt": "one too many", **FAST})
        assert r.status_code == 429 and r.headers["retry-after"] == "1" and "queue" in r.json()["detail"]
        gated.gate.set()
        assert (await slow).status_code == 200 and (await queued).status_code == 200
        m = (await c.get("/metrics")).text
        assert metric(m, 'diffrt_requests_total{code="429"}') == 1

    run_with_client(app, fn)

    app, gated = make_app(pipe, timeout_s=0.2)

    async def timeout(c):
        gated.hold()
        r = await c.post("/v1/images", json={"prompt": "too slow", **FAST})
        assert r.status_code == 504 and "0.2" in r.json()["detail"]
        waiting = asyncio.create_task(c.post("/v1/images", json={"prompt": "never runs", **FAST, "width": 48}))
        await asyncio.sleep(0.4)  # times out in the queue: its slot is freed and it never reaches the engine
        assert (await waiting).status_code == 504
        assert metric((await c.get("/metrics")).text, "diffrt_queue_depth") == 0
        gated.gate.set()
        await asyncio.sleep(0.1)
        assert ["never runs"] not in gated.prompts
        m = (await c.get("/metrics")).text
        assert metric(m, 'diffrt_requests_dropped_total{reason="timeout"}') == 1
        assert metric(m, 'diffrt_requests_total{code="504"}') == 2

    run_with_client(app, timeout)


def test_readiness_and_metrics(pipe):
    release = threading.Event()

    def slow_loader(path):
        assert release.wait(30)
        return pipe

    app = create_app(ServeSettings(str(pipe.bundle)), loader=slow_loader)

    async def fn(c):
        assert (await c.get("/healthz")).status_code == 200
        r = await c.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = await c.post("/v1/images", json={"prompt": "early"})
        assert r.status_code == 503 and "retry-after" in r.headers
        release.set()
        await _ready(c)
        assert (await c.post("/v1/images", json={"prompt": "ok", **FAST})).status_code == 200
        m = (await c.get("/metrics")).text
        assert metric(m, "diffrt_ready") == 1
        assert metric(m, 'diffrt_requests_total{code="200"}') == 1
        assert metric(m, 'diffrt_requests_total{code="503"}') == 1
        assert metric(m, "diffrt_queue_depth") == 0
        assert metric(m, "diffrt_batch_images_count") == 1 and metric(m, 'diffrt_batch_images_bucket{le="1.0"}') == 1
        assert metric(m, 'diffrt_stage_seconds_count{stage="unet"}') == 1
        assert metric(m, "diffrt_request_seconds_count") == 2
        assert "# TYPE diffrt_queue_depth gauge" in m

    run_with_client(app, fn, ready=False)


def test_failed_load_stays_unready(sd1_bundle):
    def broken(path):
        raise FileNotFoundError("no bundle here")

    app = create_app(ServeSettings(str(sd1_bundle)), loader=broken)

    async def fn(c):
        await asyncio.sleep(0.1)
        r = await c.get("/readyz")
        assert r.status_code == 503 and "no bundle here" in r.json()["error"]
        assert (await c.get("/healthz")).status_code == 200

    run_with_client(app, fn, ready=False)


def test_disconnected_client_is_dropped_before_the_engine(pipe):
    app, gated = make_app(pipe)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=30) as c:
            for _ in range(500):
                if server.started and c.get("/readyz").status_code == 200:
                    break
                time.sleep(0.01)
            gated.hold()
            slow: dict = {}
            t = threading.Thread(
                target=lambda: slow.update(
                    r=httpx.post(f"{base}/v1/images", timeout=30, json={"prompt": "slow", **FAST})
                )
            )
            t.start()
            assert gated.entered.wait(10)
            # A client that sends its request and hangs up while it waits in the queue.
            body = json.dumps({"prompt": "hung up", **FAST, "width": 48}).encode()
            gone = socket.create_connection(("127.0.0.1", port))
            gone.sendall(
                b"POST /v1/images HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            for _ in range(500):
                if metric(c.get("/metrics").text, "diffrt_queue_depth") == 1:
                    break
                time.sleep(0.01)
            gone.close()
            time.sleep(0.2)  # let the server see the FIN
            gated.gate.set()
            t.join(30)
            assert slow["r"].status_code == 200
            for _ in range(200):
                m = c.get("/metrics").text
                if metric(m, 'diffrt_requests_dropped_total{reason="disconnected"}') == 1:
                    break
                time.sleep(0.01)
            assert metric(m, 'diffrt_requests_dropped_total{reason="disconnected"}') == 1
            assert all("hung up" not in p for p in gated.prompts)
            assert metric(m, "diffrt_images_generated_total") == 1  # the slow request's only
            assert c.post("/v1/images", json={"prompt": "after", **FAST}).status_code == 200
    finally:
        server.should_exit = True
        thread.join(10)


def test_threading_rules(pipe):
    """A Pipeline may be shared between threads (its lock serialises calls: same images as one at a time);
    the app only ever calls it from the batcher's engine thread, never from the event loop."""
    kw = dict(num_inference_steps=3, scheduler="euler", seed=3)
    want = np.asarray(pipe("shared", **kw).images[0])
    got: list = [None] * 4

    def call(i: int) -> None:
        got[i] = np.asarray(pipe("shared", **kw).images[0])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(g is not None and np.array_equal(g, want) for g in got)

    app, gated = make_app(pipe)

    async def fn(c):
        answers = await asyncio.gather(*(c.post("/v1/images", json={"prompt": f"t{i}", **FAST}) for i in range(3)))
        assert all(a.status_code == 200 for a in answers)

    run_with_client(app, fn)
    assert gated.threads and all(name.startswith("diffrt-engine") for name in gated.threads)


def _b64_png(im: Image.Image) -> str:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def test_image_jobs_take_base64_images_and_refuse_bad_ones_with_422(pipe):
    """image and mask_image as base64 (or data: URLs): the same pictures as the Python API from the same
    bytes; hostile or inconsistent ones are 422s naming the field and never reach the engine."""
    from tests.builders.images import png_bomb, truncated_png
    from tests.engine.test_pipeline_img2img import mask, picture

    init, hole = _b64_png(picture(1)), _b64_png(mask())
    steps = {"num_inference_steps": 4, "scheduler": "euler", "seed": 9}
    bad = [
        ({"image": "%%% not base64"}, "image", "base64"),
        ({"image": base64.b64encode(truncated_png()).decode()}, "image", "not a readable image"),
        ({"image": base64.b64encode(png_bomb()).decode()}, "image", "pixels"),
        ({"mask_image": hole}, "mask_image", "needs image"),
        ({"image": init, "strength": 0}, "strength", "strength"),
        ({"image": init, "strength": 1.5}, "strength", "strength"),
        ({"image": init, "strength": 0.1}, "strength", "no step"),
        ({"strength": 0.5}, "strength", "image"),
        ({"image": init, "paste_back": True}, "paste_back", "mask_image"),
    ]
    app, gated = make_app(pipe)

    async def fn(c):
        r = await c.post("/v1/images", json={"prompt": "a fox", "image": init, "strength": 0.5, **steps},
                         headers={"Accept": "image/png"})  # fmt: skip
        assert r.status_code == 200, r.text
        img2img = decode_png(r.content)
        digest = hashlib.sha256(base64.b64decode(init)).hexdigest()[:10]
        assert "Denoising strength: 0.5" in img2img.info["parameters"]
        assert f"Init image hash: {digest}" in img2img.info["parameters"]
        body = {"prompt": "a fox", "image": init, "mask_image": "data:image/png;base64," + hole, **steps}
        r = await c.post("/v1/images", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["parameters"]["job"] == "inpaint" and r.json()["parameters"]["strength"] == 1.0
        inpaint = decode_png(base64.b64decode(r.json()["images"][0]))
        engine_calls = len(gated.prompts)
        for extra, field, needle in bad:
            r = await c.post("/v1/images", json={"prompt": "a fox", **steps, **extra})
            assert r.status_code == 422, (field, r.text)
            assert r.json()["field"] == field and needle in r.json()["detail"], (field, r.text)
        assert len(gated.prompts) == engine_calls
        return img2img, inpaint

    img2img, inpaint = run_with_client(app, fn)
    want = pipe("a fox", image=picture(1), strength=0.5, **steps).images[0]
    assert np.abs(np.asarray(img2img, np.int16) - np.asarray(want, np.int16)).max() <= 1
    want = pipe("a fox", image=picture(1), mask_image=mask(), **steps).images[0]
    assert np.abs(np.asarray(inpaint, np.int16) - np.asarray(want, np.int16)).max() <= 1


def test_served_lcm_bundle_runs_what_generate_runs(lcm_bundle, capsys, tmp_path):
    """A request without scheduler, steps or guidance takes the bundle's defaults: LCM on an LCM bundle, the
    same settings and picture as `diffrt generate` on it."""
    from diffrt.cli import main

    lcm = Pipeline.load(lcm_bundle, backend="ort-cpu")
    app, _ = make_app(lcm)

    async def fn(c):
        r = await c.post("/v1/images", json={"prompt": "a fox", "seed": 4}, headers={"Accept": "image/png"})
        assert r.status_code == 200, r.text
        return decode_png(r.content)

    served = run_with_client(app, fn)
    assert main(["generate", str(lcm_bundle), "a fox", "--seed", "4", "-o", str(tmp_path / "g.png")]) == 0
    generated = Image.open(tmp_path / "g.png")
    assert "Sampler: LCM" in served.info["parameters"]
    assert served.info["parameters"] == generated.text["parameters"]
    assert np.array_equal(np.asarray(served), np.asarray(generated))


def test_hires_field_runs_the_second_pass_and_refuses_bad_options(pipe):
    from diffrt.engine.hires import HiresOptions

    app, _ = make_app(pipe)
    body = {"prompt": "a fox", "width": 48, "height": 32, "seed": 5, **FAST}
    bad = [
        ({"scale": 4}, "range [32, 128]"),
        ({"upscaler": "lanczos"}, "unknown"),
        ({"strength": 0}, "strength"),
        ({"scale": 2, "colour": 1}, "colour"),
    ]

    async def fn(c):
        r = await c.post("/v1/images", json={**body, "hires": {"scale": 2, "strength": 0.5}},
                         headers={"Accept": "image/png"})  # fmt: skip
        assert r.status_code == 200, r.text
        for hires, needle in bad:
            e = await c.post("/v1/images", json={**body, "hires": hires})
            assert e.status_code == 422 and e.json()["field"].startswith("hires"), e.text
            assert needle in e.json()["detail"], e.text
        return decode_png(r.content)

    got = run_with_client(app, fn)
    assert got.size == (96, 64) and "Hires upscale: 2" in got.info["parameters"]
    want = pipe("a fox", width=48, height=32, seed=5, hires=HiresOptions(strength=0.5), **FAST).images[0]
    assert np.abs(np.asarray(got, np.int16) - np.asarray(want, np.int16)).max() <= 1
