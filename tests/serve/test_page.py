"""The web page at "/", driven in headless Chromium (Debian's chromium through Playwright) against a live
`diffrt serve` on 127.0.0.1 with two bundles: generate from a prompt with progress, upload an image and paint a
mask, interrupt, and the page's escaping, policy and API key. Screenshots go to build/test-artifacts/."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
playwright = pytest.importorskip("playwright.sync_api")

from PIL import Image  # noqa: E402

from diffrt.engine.pipeline import Pipeline  # noqa: E402
from diffrt.serve.app import ServeSettings, create_app  # noqa: E402
from tests.serve.live import LiveServer  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(os.environ.get("DIFFRT_TEST_ARTIFACTS", "build/test-artifacts"))
KEY = "page-key-456"

if CHROMIUM is None:
    reason = "no chromium on this machine (apt-get install chromium; .ci/run installs it): the page is not driven"
    if os.environ.get("CI"):
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason, allow_module_level=True)


class Paced:
    """The real Pipeline with a pause after each step: the tiny test model takes ~2 ms a step, faster than the
    page's progress polling (or a person) can watch."""

    def __init__(self, pipe: Pipeline, pause_s: float = 0.02):
        self.pipe, self.pause_s = pipe, pause_s

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def generate(self, request, callback=None):
        def paced(i, total):
            time.sleep(self.pause_s)
            if callback is not None:
                callback(i, total)

        return self.pipe.generate(request, paced)


@pytest.fixture(scope="module")
def served(sd1_bundle, lcm_bundle):
    pipes = {}

    def load(path):
        return pipes.setdefault(path, Paced(Pipeline.load(path, backend="ort-cpu", threads=2)))

    settings = ServeSettings(str(sd1_bundle), others=(str(lcm_bundle),), max_queue=4, timeout_s=120)
    live = LiveServer(create_app(settings, loader=load))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture
def page(browser, served):
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    pg = context.new_page()
    pg.requests, pg.console = [], []
    pg.on("request", lambda r: pg.requests.append(r))
    # script errors; an HTTP error answer (the 409 and 422 tests) is logged as "Failed to load resource"
    pg.on("console", lambda m: pg.console.append(m) if m.type == "error" and "Failed to load" not in m.text else None)
    pg.on("pageerror", lambda e: pg.console.append(e))
    pg.goto(served.base + "/")
    playwright.expect(pg.locator("#status")).to_have_text("ready", timeout=30_000)
    yield pg
    assert not pg.console, f"errors in the page's console: {pg.console}"
    outside = [r.url for r in pg.requests if not r.url.startswith((served.base + "/", "data:"))]
    assert not outside, f"requests left loopback: {outside}"
    context.close()


def decoded(data_url: str) -> np.ndarray:
    head, _, b64 = data_url.partition(",")
    assert head == "data:image/png;base64"
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def generations(pg) -> list[dict]:
    return [r.post_data_json for r in pg.requests if r.url.endswith("/v1/images") and r.method == "POST"]


def test_prompt_to_image_with_progress_matches_the_api(page, served):
    expect = playwright.expect
    # the form shows the default bundle's defaults, read from /v1/bundles
    info = httpx.get(f"{served.base}/v1/bundles").json()
    first = info["bundles"][0]
    expect(page.locator("#steps")).to_have_value(str(first["num_inference_steps"]))
    expect(page.locator("#sampler")).to_have_value(first["scheduler"])
    expect(page.locator("#width")).to_have_value(str(first["width"]))
    assert page.locator("#model option").count() == 2

    page.fill("#prompt", "a lighthouse at dusk")
    page.fill("#steps", "150")
    page.select_option("#sampler", "euler")
    page.fill("#seed", "11")
    page.click("#generate")
    # live progress: a step count and a preview drawn from the running sample
    expect(page.locator("#progress-text")).to_contain_text("step", timeout=30_000)
    expect(page.locator("#preview")).to_have_attribute("src", re.compile("^data:image/png;base64,"))
    expect(page.locator("#progress-text")).to_have_text("done", timeout=60_000)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "page-generated.png"), full_page=True)

    shown = decoded(page.get_attribute("#result-image", "src"))
    body = generations(page)[0]
    assert body == {
        "prompt": "a lighthouse at dusk",
        "model": first["name"],
        "width": first["width"],
        "height": first["height"],
        "num_images": 1,
        "num_inference_steps": 150,
        "guidance_scale": first["guidance_scale"],
        "seed": 11,
        "scheduler": "euler",
    }
    api = httpx.post(f"{served.base}/v1/images", json=body, timeout=120).json()
    assert np.array_equal(shown, decoded("data:image/png;base64," + api["images"][0]))
    params = page.locator("#parameters").inner_text()
    assert "euler" in params and "11" in params and "a lighthouse at dusk" in params
    assert page.locator("#gallery img").count() == 1

    # a second bundle from the select: its own defaults, and the gallery keeps both images
    page.select_option("#model", info["bundles"][1]["name"])
    second = info["bundles"][1]
    expect(page.locator("#steps")).to_have_value(str(second["num_inference_steps"]))
    expect(page.locator("#sampler")).to_have_value(second["scheduler"])
    page.click("#generate")
    expect(page.locator("#gallery img")).to_have_count(2, timeout=60_000)
    assert generations(page)[-1]["model"] == second["name"]
    page.locator("#gallery img").nth(1).click()  # the older one shows again
    assert np.array_equal(decoded(page.get_attribute("#result-image", "src")), shown)


def test_upload_and_painted_mask_inpaint(page, served, tmp_path):
    rng = np.random.default_rng(3)
    init = tmp_path / "init.png"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(init)
    page.fill("#prompt", "a cat")
    page.fill("#steps", "4")
    page.set_input_files("#image", str(init))
    mask = page.locator("#mask")
    playwright.expect(mask).to_be_visible()
    page.fill("#brush", "48")
    box = mask.bounding_box()
    # one stroke across the top-left quarter of the image
    page.mouse.move(box["x"] + box["width"] * 0.1, box["y"] + box["height"] * 0.2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.4, box["y"] + box["height"] * 0.2, steps=8)
    page.mouse.up()
    page.fill("#strength", "0.7")
    page.screenshot(path=str(ARTIFACTS / "page-mask.png"), full_page=True)
    page.click("#generate")
    playwright.expect(page.locator("#progress-text")).to_have_text("done", timeout=60_000)

    body = generations(page)[0]
    assert body["strength"] == 0.7 and body["width"] == body["height"] == 64
    assert decoded(body["image"]).tolist() == np.asarray(Image.open(init).convert("RGB")).tolist()
    m = decoded(body["mask_image"])[..., 0]
    assert m.shape == (64, 64) and set(np.unique(m)) - {0, 255} <= set(range(1, 255))  # white stroke, antialiased
    assert m[13, 10:25].min() == 255 and m[50:, :].max() == 0 and m[:, 40:].max() == 0
    params = page.locator("#parameters").inner_text()
    assert "inpaint" in params
    assert 0 <= body["seed"] < 2**32 and f"seed\t{body['seed']}" in params  # a blank seed is drawn, and shown
    shown = decoded(page.get_attribute("#result-image", "src"))
    api = httpx.post(f"{served.base}/v1/images", json=body, timeout=120).json()
    assert np.array_equal(shown, decoded("data:image/png;base64," + api["images"][0]))

    # no mask painted: image to image
    page.click("#clear-mask")
    page.click("#generate")
    playwright.expect(page.locator("#gallery img")).to_have_count(2, timeout=60_000)
    last = generations(page)[-1]
    assert "image" in last and "mask_image" not in last and last["seed"] != body["seed"]
    assert "img2img" in page.locator("#parameters").inner_text()


def test_interrupt_ends_with_a_clear_status(page):
    page.fill("#prompt", "a long one")
    page.fill("#steps", "150")
    page.fill("#width", "128")
    page.fill("#height", "128")
    page.click("#generate")
    playwright.expect(page.locator("#progress-text")).to_contain_text("step", timeout=30_000)
    page.click("#interrupt")
    playwright.expect(page.locator("#error")).to_contain_text("409", timeout=60_000)
    assert "interrupted" in page.locator("#error").inner_text()
    playwright.expect(page.locator("#generate")).to_be_enabled()
    assert page.locator("#gallery img").count() == 0


def test_page_escapes_what_it_shows_and_reports_errors(page):
    hostile = '<img src=x onerror="window.__pwned=1"><b>bold</b>'
    page.fill("#prompt", hostile)
    page.fill("#negative_prompt", "<script>window.__pwned=2</script>")
    page.fill("#steps", "2")
    page.click("#generate")
    playwright.expect(page.locator("#gallery img")).to_have_count(1, timeout=60_000)
    assert page.evaluate("window.__pwned") is None
    assert page.locator("#parameters b, #parameters img, #parameters script, #gallery b").count() == 0
    assert hostile in page.locator("#parameters").inner_text()
    # a size outside the bundle's range: the browser's own validation (the form's min/max/step) stops it
    page.fill("#width", "8192")
    page.click("#generate")
    assert page.locator("#width:invalid").count() == 1 and len(generations(page)) == 1
    # what only the server checks: its one-line 422 is shown, and nothing is added
    page.fill("#width", "64")
    page.fill("#seed", "99999999999999999999")
    page.click("#generate")
    playwright.expect(page.locator("#error")).to_contain_text("422", timeout=30_000)
    assert "seed" in page.locator("#error").inner_text()
    assert page.locator("#gallery img").count() == 1 and len(generations(page)) == 2


def test_page_files_policy_and_fixed_set(served):
    r = httpx.get(served.base + "/")
    csp = r.headers["content-security-policy"]
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "default-src 'none'" in csp
    assert "<script" in r.text and "http" not in r.text  # no link to anything but this server
    assert httpx.get(served.base + "/page/page.js").headers["content-type"].startswith("text/javascript")
    for bad in ("/page/../app.py", "/page/%2e%2e%2fapp.py", "/page/index.htm", "/page/page.py"):
        assert httpx.get(served.base + bad).status_code == 404, bad


def test_page_behind_the_api_key(browser, sd1_bundle):
    pipe = Pipeline.load(sd1_bundle, backend="ort-cpu", threads=2)
    live = LiveServer(create_app(ServeSettings(str(sd1_bundle), api_key=KEY), loader=lambda path: pipe))
    try:
        r = httpx.get(live.base + "/")
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")
        assert httpx.get(live.base + "/v1/bundles").status_code == 401
        context = browser.new_context(http_credentials={"username": "", "password": KEY})
        pg = context.new_page()
        pg.goto(live.base + "/")
        playwright.expect(pg.locator("#status")).to_have_text("ready", timeout=30_000)
        pg.fill("#prompt", "behind a key")
        pg.fill("#steps", "2")
        pg.click("#generate")
        playwright.expect(pg.locator("#gallery img")).to_have_count(1, timeout=60_000)
        context.close()
    finally:
        live.stop()
