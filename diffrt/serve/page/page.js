// diffrt's page: a form over POST /v1/images, progress from GET /v1/progress, the session's images kept here.
// Everything it shows from the server or the user goes through textContent or an <img> src: nothing is parsed
// as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const POLL_MS = 250;
const session = { bundles: [], image: null, painted: false, busy: false, gallery: [] };

function message(status, body) {
  // The one-line message of any of the server's error shapes (diffrt's, FastAPI's, OpenAI's).
  if (body && typeof body.detail === "string") return body.detail;
  if (body && Array.isArray(body.detail)) return body.detail.map((d) => d.msg || JSON.stringify(d)).join("; ");
  if (body && body.error && body.error.message) return body.error.message;
  return `HTTP ${status}`;
}

async function api(path, options) {
  const response = await fetch(path, { credentials: "same-origin", ...options });
  let body = null;
  try {
    body = await response.json();
  } catch (e) {
    body = null;
  }
  if (!response.ok) throw new Error(`${response.status}: ${message(response.status, body)}`);
  return body;
}

function showError(text) {
  $("error").textContent = text || "";
}

function bundle() {
  return session.bundles.find((b) => b.name === $("model").value) || session.bundles[0];
}

function applyBundle() {
  const b = bundle();
  for (const side of ["width", "height"]) {
    const input = $(side);
    Object.assign(input, { min: b.min_size, max: b.max_size, step: b.size_multiple });
    if (!session.image) input.value = b[side];
  }
  $("steps").value = b.num_inference_steps;
  $("guidance").value = b.guidance_scale;
  $("num_images").max = b.max_images;
  const sampler = $("sampler");
  sampler.replaceChildren(...b.samplers.map((name) => new Option(name, name, false, name === b.scheduler)));
  const notes = [];
  if (!b.image_to_image) notes.push("This bundle has no VAE encoder: text to image only (re-export it for image jobs).");
  if (b.inpainting_unet) notes.push("This bundle's UNet is an inpainting UNet: give an image and paint a mask.");
  $("bundle-note").textContent = notes.join(" ");
  $("init").disabled = !b.image_to_image;
}

function fitSide(value, b) {
  const m = b.size_multiple;
  return Math.min(b.max_size, Math.max(b.min_size, Math.floor(value / m) * m));
}

function loadImage(file) {
  const reader = new FileReader();
  reader.onload = () => {
    const img = new Image();
    img.onload = () => {
      const source = $("source");
      const mask = $("mask");
      source.width = mask.width = img.naturalWidth;
      source.height = mask.height = img.naturalHeight;
      source.getContext("2d").drawImage(img, 0, 0);
      mask.getContext("2d").clearRect(0, 0, mask.width, mask.height);
      session.image = reader.result;
      session.painted = false;
      const b = bundle();
      $("width").value = fitSide(img.naturalWidth, b);
      $("height").value = fitSide(img.naturalHeight, b);
      $("canvas-box").hidden = false;
    };
    img.onerror = () => showError("that file is not an image this browser can read (PNG, JPEG or WebP)");
    img.src = reader.result;
  };
  reader.readAsDataURL(file);
}

function removeImage() {
  session.image = null;
  session.painted = false;
  $("image").value = "";
  $("canvas-box").hidden = true;
  applyBundle();
}

function setUpMaskPainting() {
  const mask = $("mask");
  const ctx = mask.getContext("2d");
  let last = null;
  const point = (event) => {
    const r = mask.getBoundingClientRect();
    return [((event.clientX - r.left) * mask.width) / r.width, ((event.clientY - r.top) * mask.height) / r.height];
  };
  const paint = (event) => {
    const [x, y] = point(event);
    const radius = (Number($("brush").value) * mask.width) / mask.getBoundingClientRect().width / 2;
    ctx.fillStyle = ctx.strokeStyle = "#fff";
    ctx.lineCap = "round";
    ctx.lineWidth = radius * 2;
    ctx.beginPath();
    if (last) {
      ctx.moveTo(last[0], last[1]);
      ctx.lineTo(x, y);
      ctx.stroke();
    }
    ctx.beginPath();
    ctx.arc(x, y, radius, 0, 2 * Math.PI);
    ctx.fill();
    last = [x, y];
    session.painted = true;
  };
  mask.addEventListener("pointerdown", (event) => {
    mask.setPointerCapture(event.pointerId);
    last = null;
    paint(event);
  });
  mask.addEventListener("pointermove", (event) => {
    if (event.buttons & 1) paint(event);
  });
  mask.addEventListener("pointerup", () => {
    last = null;
  });
  $("clear-mask").addEventListener("click", () => {
    ctx.clearRect(0, 0, mask.width, mask.height);
    session.painted = false;
  });
}

function maskDataUrl() {
  // White where painted (repaint), black elsewhere: the server's mask_image.
  const mask = $("mask");
  const out = document.createElement("canvas");
  out.width = mask.width;
  out.height = mask.height;
  const ctx = out.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, out.width, out.height);
  ctx.drawImage(mask, 0, 0);
  return out.toDataURL("image/png");
}

function number(id, parse) {
  const text = $(id).value.trim();
  return text === "" ? undefined : parse(text);
}

function randomSeed() {
  // A blank seed field draws one here, as A1111's -1 does; the result's parameters show it.
  return crypto.getRandomValues(new Uint32Array(1))[0];
}

function requestBody() {
  const body = {
    prompt: $("prompt").value,
    model: $("model").value,
    negative_prompt: $("negative_prompt").value || undefined,
    width: number("width", parseInt),
    height: number("height", parseInt),
    num_images: number("num_images", parseInt),
    num_inference_steps: number("steps", parseInt),
    guidance_scale: number("guidance", parseFloat),
    seed: number("seed", parseInt) ?? randomSeed(),
    scheduler: $("sampler").value || undefined,
  };
  if (session.image) {
    body.image = session.image;
    body.strength = number("strength", parseFloat);
    if (session.painted) body.mask_image = maskDataUrl();
  }
  return body;
}

function showResult(entry) {
  $("result").hidden = false;
  $("result-image").src = entry.src;
  const link = $("download");
  link.href = entry.src;
  link.download = `diffrt-${entry.parameters.seed ?? "image"}.png`;
  const shown = Object.entries(entry.parameters).filter(([, value]) => value !== null && value !== undefined);
  const rows = shown.map(([key, value]) => {
    const row = document.createElement("tr");
    const name = document.createElement("td");
    const text = document.createElement("td");
    name.textContent = key;
    text.textContent = typeof value === "object" ? JSON.stringify(value) : String(value);
    row.append(name, text);
    return row;
  });
  $("parameters").tBodies[0].replaceChildren(...rows);
  for (const thumb of $("gallery").children) thumb.classList.toggle("current", thumb.src === entry.src);
}

function addToGallery(entry) {
  session.gallery.push(entry);
  const thumb = document.createElement("img");
  thumb.src = entry.src;
  thumb.alt = entry.parameters.prompt;
  thumb.title = entry.parameters.prompt;
  thumb.addEventListener("click", () => showResult(entry));
  $("gallery").prepend(thumb);
}

async function pollProgress() {
  while (session.busy) {
    try {
      const p = await api("/v1/progress");
      if (p.running && p.total) {
        $("progress").value = p.progress;
        $("progress-text").textContent = `step ${p.step} / ${p.total}, ${p.eta_s.toFixed(1)} s left`;
        if (p.preview) $("preview").src = p.preview;
      } else if (p.queued) {
        $("progress-text").textContent = `waiting: ${p.queued} in the queue`;
      }
    } catch (e) {
      // progress is best effort; the generation request reports real errors
    }
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
}

async function generate(event) {
  event.preventDefault();
  if (session.busy) return;
  showError("");
  const body = requestBody();
  if (!body.prompt.trim()) return showError("write a prompt first");
  session.busy = true;
  $("generate").disabled = true;
  $("interrupt").disabled = false;
  $("progress-box").hidden = false;
  $("progress").value = 0;
  $("progress-text").textContent = "starting…";
  $("preview").removeAttribute("src");
  const started = performance.now();
  const polling = pollProgress();
  try {
    const out = await api("/v1/images", {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "application/json" },
      body: JSON.stringify(body),
    });
    const seeds = out.parameters.all_seeds || [];
    out.images.forEach((b64, i) => {
      const parameters = { prompt: body.prompt, ...out.parameters, seed: seeds[i] ?? out.parameters.seed };
      delete parameters.all_seeds;
      const entry = { src: `data:image/png;base64,${b64}`, parameters };
      addToGallery(entry);
      if (i === 0) showResult(entry);
    });
    const seconds = ((performance.now() - started) / 1000).toFixed(2);
    $("status").textContent = `${out.images.length} image(s) in ${seconds} s`;
    $("progress").value = 1;
    $("progress-text").textContent = "done";
  } catch (e) {
    showError(e.message);
    $("progress-text").textContent = "stopped";
  } finally {
    session.busy = false;
    await polling;
    $("generate").disabled = false;
    $("interrupt").disabled = true;
  }
}

async function interrupt() {
  try {
    await api("/v1/interrupt", { method: "POST" });
  } catch (e) {
    showError(e.message);
  }
}

async function init() {
  setUpMaskPainting();
  $("form").addEventListener("submit", generate);
  $("interrupt").addEventListener("click", interrupt);
  $("model").addEventListener("change", applyBundle);
  $("image").addEventListener("change", () => $("image").files[0] && loadImage($("image").files[0]));
  $("remove-image").addEventListener("click", removeImage);
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("form").requestSubmit();
  });
  try {
    const info = await api("/v1/bundles");
    session.bundles = info.bundles;
    $("model").replaceChildren(...info.bundles.map((b) => new Option(b.title, b.name, false, b.name === info.default)));
    applyBundle();
    $("status").textContent = "ready";
  } catch (e) {
    showError(`could not read the server's bundles: ${e.message}`);
    $("status").textContent = "";
  }
}

document.addEventListener("DOMContentLoaded", init);
