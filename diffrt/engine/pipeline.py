"""`diffrt.Pipeline`: a Request -> text encoder(s) -> [VAE encoder] -> sampler loop over the UNet -> VAE decoder
-> upscaler.

Jobs: text to image; image to image (the init image encoded, noised to the first kept step); inpainting with an
inpainting UNet (latents + mask + masked-image latents as its input) or an ordinary one (the known region put
back after every step). Which one follows from the request and the bundle's UNet spec.

Seeds: image i of a call has its own generator `np.random.default_rng(seeds[i])` (PCG64), which draws, as
diffusers draws from a generator per image: the init image's posterior noise (image jobs that encode it), the
initial noise (1, C, H/8, W/8), the masked image's posterior noise (inpainting), then the stochastic samplers'
per-step noise, in step order. Same bundle, backend, seeds and settings -> the same images.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from diffrt.bundle import LORA_COMPONENTS, TOKENIZER, TOKENIZER_2, Manifest, load_manifest, load_token_table
from diffrt.engine.backends import Backend, Session, make_backend
from diffrt.engine.conditioning import (
    Prompts,
    TextEncoder,
    guidance_embedding,
    text_conditioning,
    time_ids,
    window_count,
)
from diffrt.engine.embeddings import Embedding, load_embeddings
from diffrt.engine.hires import resize_latents
from diffrt.engine.images import blurred, init_image_array, to_hwc, to_pil
from diffrt.engine.lora import SUFFIX, WeightMap, find_loras, lora_hash, merged_weights, read_lora
from diffrt.engine.request import (
    REFINER_AT,
    Request,
    bundle_defaults,
    check_loras,
    check_size,
    clip_skips,
    hires_size,
    strength_in_schedule,
)
from diffrt.engine.samplers import denoise, from_vp, initial, keep_known
from diffrt.engine.schedules import handoff_step, make_schedule
from diffrt.engine.tokenizer import ClipTokenizer
from diffrt.errors import BadInput, NonFiniteOutput

log = logging.getLogger(__name__)


# merged LoRA sets kept: the one in use (its sessions read its weights) and the one before, so going back is new
# sessions only; each holds the weights it changes (2.4 GB for a LoRA on every SD 1.5 attention, MLP and resnet)
LORA_SETS = 2
LORA_FILES = 8  # LoRA files kept read (their low-rank factors: megabytes)


def _stamp(path: Path) -> tuple[int, int]:
    """A file's modification time and size: a LoRA written again is read again."""
    try:
        st = path.stat()
    except OSError:
        return (0, 0)  # read_lora names the missing file
    return (st.st_mtime_ns, st.st_size)


def _offset(callback: Callable[[int, int], None] | None, done: int, total: int):
    """A pass's progress callback as steps of the whole call (two passes with hires fix)."""
    if callback is None:
        return None
    return lambda i, _: callback(done + i, total)


@dataclass
class PipelineOutput:
    images: list  # PIL images, or (H, W, 3) float32 arrays in [0, 1]
    timings: dict[str, float]  # seconds: tokenizer, text_encoder, vae_encoder, denoise (loop), unet (all calls),
    # vae_decoder, upscaler, total
    unet_times: list[float] = field(default_factory=list)  # seconds per UNet call
    parameters: dict = field(default_factory=dict)  # the settings used, for PNG metadata and logs


class Pipeline:
    """Images from a bundle. Thread-safe: calls on one Pipeline run one at a time."""

    def __init__(self, bundle: Path, manifest: Manifest, backend: Backend):
        self.bundle, self.manifest, self.backend = bundle, manifest, backend
        self.sessions: dict[str, Session] = {}
        for name, entry in manifest.components.items():
            path = bundle / entry.files.get(backend.precision, entry.files["fp32"])
            self.sessions[name] = backend.load(entry.spec, path)
        # in order: the first encoder takes `prompt`, the next `prompt_2` (SDXL); the SDXL refiner has only
        # the second encoder, which then takes `prompt`, as diffusers' refiner pipeline pairs them
        pairs = (("text_encoder", manifest.tokenizer), ("text_encoder_2", manifest.tokenizer_2))
        self._encoder_names = [name for name, info in pairs if info is not None]
        self.text_encoders = [
            TextEncoder(
                ClipTokenizer(bundle / rel, info),
                self.sessions[name],
                clip_skips(manifest, name),
                load_token_table(bundle, manifest, name),
            )
            for name, rel, info in (
                ("text_encoder", TOKENIZER, manifest.tokenizer),
                ("text_encoder_2", TOKENIZER_2, manifest.tokenizer_2),
            )
            if info is not None
        ]
        self.unet_inputs = {t.name: t for t in manifest.components["unet"].spec.inputs}
        self.max_chunks = manifest.components["unet"].spec.max_chunks  # a prompt's 75-token windows
        self._lock = threading.Lock()
        self._warned_no_upscaler = False
        self.refiner: Pipeline | None = None  # SDXL: the model that finishes the schedule (load(refiner=))
        self.embeddings: dict[str, Embedding] = {}  # textual inversion, by name (use_embeddings)
        self.latest_sample: np.ndarray | None = None  # the last latents the UNet saw (VP): for progress previews
        self._weight_map: WeightMap | None = None  # read at the first LoRA
        self._lora_key: tuple = ()  # the LoRA set merged into the sessions; () the base weights
        self._lora_sets: dict[tuple, dict] = {}  # LoRA set -> merged weights per component, oldest first
        self._merged_in: dict[str, bool] = {}
        self.lora_switch_s = 0.0  # seconds the last LoRA switch took (merge + new sessions)
        self.lora_dir: Path | None = None  # where requests' LoRA names are looked up (load(lora_dir=))
        self.lora_paths = True  # whether requests may name LoRA files by path
        self.allow_pickle = False
        self._lora_files: dict[tuple, tuple] = {}  # (file, stamp) -> its updates and hash, the last LORA_FILES
        self._lora_read_lock = threading.Lock()

    @classmethod
    def load(
        cls,
        bundle: str | Path,
        backend: str = "auto",
        threads: int = 0,
        refiner: str | Path | None = None,
        embeddings: str | Path | None = None,
        allow_pickle: bool = False,
        lora_dir: str | Path | None = None,
        lora_paths: bool = True,
    ) -> Pipeline:
        """Open a bundle directory on a backend: "tensorrt", "ort-cuda", "ort-cpu" or "auto". `refiner`: an SDXL
        bundle that takes over the last part of every schedule (Request.refiner_at) from this SDXL base.
        `embeddings`: a folder of textual inversion embeddings that prompts call by name (use_embeddings).
        `lora_dir`: a folder of LoRAs that requests name (Request.loras, <lora:NAME:SCALE>); `lora_paths=False`
        (a service) takes names in that folder only, never a path from a request."""
        bundle = Path(bundle)
        manifest = load_manifest(bundle)
        pipe = cls(bundle, manifest, make_backend(backend, manifest, threads, bundle))
        pipe.lora_dir = None if lora_dir is None else Path(lora_dir)
        pipe.lora_paths = lora_paths
        pipe.allow_pickle = allow_pickle  # also .pt LoRAs (and embeddings)
        if pipe.lora_dir is not None and not pipe.lora_dir.is_dir():
            raise BadInput(f"LoRA folder {lora_dir} does not exist")
        if embeddings is not None:
            pipe.use_embeddings(embeddings, allow_pickle)
        if refiner is not None:
            pipe.refiner = cls.load(refiner, backend, threads, embeddings=embeddings, allow_pickle=allow_pickle)
            base, ref = manifest.model, pipe.refiner.manifest.model
            if base.family != "sdxl" or ref.family != "sdxl":
                raise BadInput(
                    f"a refiner takes over from an SDXL base with an SDXL model; here base {bundle.name} is "
                    f"{base.family} and refiner {Path(refiner).name} is {ref.family}"
                )
            if (base.latent_channels, base.vae_scale_factor) != (ref.latent_channels, ref.vae_scale_factor):
                raise BadInput(
                    f"refiner {Path(refiner).name} has another latent space than the base; use a matching one"
                )
        return pipe

    def use_embeddings(self, folder: str | Path, allow_pickle: bool = False) -> list[str]:
        """Load the textual inversion embeddings of `folder` that fit this bundle's text encoders (others are
        skipped with a warning); a prompt word that is an embedding's name then stands for its vectors. Replaces
        embeddings loaded before. Returns the names."""
        if any(e.table is None for e in self.text_encoders):
            raise BadInput(f"{self.bundle.name} was exported before textual inversion; re-export it to use embeddings")
        found = load_embeddings(folder, [e.table.shape[1] for e in self.text_encoders], allow_pickle)
        with self._lock:
            for i, encoder in enumerate(self.text_encoders):
                vectors = [e.vectors[i] for e in found.values()]
                encoder.tokenizer.use_embeddings({n: len(e.vectors[i]) for n, e in found.items()}, len(encoder.table))
                self.text_encoders[i] = replace(encoder, extra=np.concatenate(vectors) if vectors else None)
            self.embeddings = found
        return list(found)

    @property
    def default_sampler(self) -> str:
        """The sampler a request that names none runs."""
        return bundle_defaults(self.manifest)["scheduler"]

    @property
    def has_upscaler(self) -> bool:
        return "upscaler" in self.sessions

    def __call__(self, prompt, *, callback: Callable[[int, int], None] | None = None, **settings) -> PipelineOutput:
        """Generate images: `settings` are the fields of `diffrt.engine.request.Request` (diffusers' names:
        negative_prompt, num_inference_steps, guidance_scale, scheduler, height, width, num_images, seed, latents,
        image, strength, mask_image, ...). `callback(i, total)` runs after every UNet call."""
        return self.generate(Request(prompt, **settings), callback)

    def check_request(self, request: Request) -> Request:
        """The request resolved against this bundle (defaults filled, images decoded), or BadInput. Services
        call it to refuse a request before queueing it; the resolved request runs without resolving again."""
        r = request.resolve(self.manifest)
        if r.loras:
            r = replace(r, loras=self._find_loras(r.loras))
        if self.refiner is None:
            if r.refiner_at is not None:
                raise BadInput(
                    "refiner_at needs a refiner: Pipeline.load(..., refiner=BUNDLE) or --refiner", "refiner_at"
                )
            return r
        if r.image is not None or r.hires is not None:
            raise BadInput("a refiner runs text to image only (no image, mask or hires with it)", "refiner_at")
        r = replace(r, refiner_at=REFINER_AT if r.refiner_at is None else r.refiner_at)
        check_size(self.refiner.manifest, r.height, r.width)
        config = self.manifest.scheduler
        schedule = make_schedule(r.scheduler, config, r.num_inference_steps)  # the checks of handoff_step
        try:
            handoff_step(r.scheduler, schedule.timesteps, r.refiner_at, len(schedule.alphas_cumprod))
        except BadInput as e:
            raise BadInput(str(e), "refiner_at") from None
        return r

    def text_windows(self, r: Request) -> tuple[int, ...]:
        """The 75-token windows a resolved request's prompts fill here (and in the refiner): requests share one
        call only with equal counts, since padding a prompt with empty windows changes its picture."""
        m = self.manifest.model
        cfg = r.guidance_scale > 1.0 and m.classifier_free_guidance
        texts, _ = Prompts(list(r.prompts), list(r.prompt_2), r.negative_prompt, r.negative_prompt_2).texts(
            cfg, m.force_zeros_for_empty_prompt
        )
        own = window_count(self.text_encoders, texts[: len(self.text_encoders)], r.prompt_syntax, self.max_chunks)
        return (own, *(self.refiner.text_windows(r) if self.refiner is not None else ()))

    def generate(self, request: Request, callback: Callable[[int, int], None] | None = None) -> PipelineOutput:
        r = self.check_request(request)
        with self._lock:
            self._use_loras(r.loras)
            return self._generate(r, callback)

    def use_loras(self, loras: Sequence[tuple[str | Path, float]]) -> float:
        """Switch to a LoRA set now (generate switches to each request's own): seconds the switch took."""
        found = self._find_loras(check_loras(loras))
        with self._lock:
            self._use_loras(found)
        return self.lora_switch_s

    def _find_loras(self, loras: Sequence[tuple[str | Path, float]]) -> tuple[tuple[Path, float], ...]:
        """The files of a request's LoRAs, each read (once per version) so that one that does not fit this
        bundle is refused before the request waits or runs."""
        found = find_loras(loras, self.lora_dir, self.lora_paths)
        refused = getattr(self.backend, "no_lora", None)  # a backend that cannot switch weights says why
        if refused and any(scale for _, scale in found):
            raise BadInput(refused, "loras")
        for path, _ in found:
            self._lora_file(path)
        return found

    def _use_loras(self, loras: tuple[tuple[Path, float], ...]) -> None:
        """Make the sessions of the components LoRAs change again, with `loras` merged into the base weights,
        unless they are the ones in use. Merged weights are kept for the last LORA_SETS sets."""
        key = tuple((str(f.resolve()), _stamp(f), scale) for f, scale in loras if scale)
        if key == self._lora_key:
            self.lora_switch_s = 0.0
            return
        start = time.perf_counter()
        merged = self._lora_sets.pop(key, None)
        if merged is None:
            updates = [(self._lora_file(f)[0], scale) for f, scale in loras if scale]
            merged = merged_weights(self.bundle, self._weights(), updates, self.backend.precision)
        self._lora_sets[key] = merged
        while len(self._lora_sets) > LORA_SETS:
            self._lora_sets.pop(next(iter(self._lora_sets)))
        for name in LORA_COMPONENTS:
            if name in self.sessions and (merged.get(name) or self._merged_in.get(name)):
                entry = self.manifest.components[name]
                path = self.bundle / entry.files.get(self.backend.precision, entry.files["fp32"])
                self._set_session(name, self.backend.load(entry.spec, path, merged.get(name) or None))
        self._merged_in = {name: bool(w) for name, w in merged.items()}
        self._lora_key = key
        self.lora_switch_s = time.perf_counter() - start
        log.info("LoRAs %s in %.2f s", ", ".join(f"{f.name}:{s:g}" for f, s in loras) or "off", self.lora_switch_s)

    def _weights(self) -> WeightMap:
        if self._weight_map is None:
            self._weight_map = WeightMap.of_bundle(self.bundle, [c for c in LORA_COMPONENTS if c in self.sessions])
        return self._weight_map

    def _lora_file(self, path: Path) -> tuple[list, str]:
        """A LoRA file's updates against this bundle and its short hash, read once per version of the file."""
        key = (str(path.resolve()), _stamp(path))
        with self._lora_read_lock:
            if key not in self._lora_files:
                updates = read_lora(path, self._weights(), self.allow_pickle)
                self._lora_files[key] = (updates, lora_hash(path))
                while len(self._lora_files) > LORA_FILES:
                    self._lora_files.pop(next(iter(self._lora_files)))
            return self._lora_files[key]

    def _set_session(self, name: str, session: Session) -> None:
        self.sessions[name] = session
        for i, encoder in enumerate(self.text_encoders):
            if self._encoder_names[i] == name:
                self.text_encoders[i] = replace(encoder, session=session)

    def warm_up(self) -> None:
        """One small real generation of the bundle's usual job (sessions allocate, graphs are captured)."""
        if self.refiner is not None:  # text to image through both models (enough steps for each to take some)
            self("warm-up", num_inference_steps=10, output_type="np")
            return
        gray = np.full((self.manifest.model.default_size,) * 2 + (3,), 0.5, np.float32)
        job = {"image": gray, "mask_image": np.ones(gray.shape[:2], np.float32), "strength": 1.0}
        self(
            "warm-up",
            num_inference_steps=1,
            output_type="np",
            **(job if "vae_encoder" in self.sessions else {}),
        )

    def _encode(self, image: np.ndarray, eps: np.ndarray, timings: dict[str, float], key: str = "vae_encoder"):
        """Scaled latents (n, C, h, w) of one image (1, 3, H, W): the posterior sampled with eps, as diffusers."""
        t0 = time.perf_counter()
        out = self.sessions["vae_encoder"].run({"image": image})
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0
        mean, logvar = out["latent_mean"], out["latent_logvar"]
        if not (np.isfinite(mean).all() and np.isfinite(logvar).all()):
            raise NonFiniteOutput("vae_encoder produced NaN/inf; FP16 VAE overflow: use the FP32 bundle (ort-cpu)")
        std = np.exp(np.float32(0.5) * np.clip(logvar, -30.0, 20.0))
        return (mean + std * eps) * np.float32(self.manifest.model.scaling_factor)

    def _eps_fn(self, conditions: dict, cfg: bool, n: int, guidance: float, extra, unet_times: list[float]):
        """The guided noise prediction for the samplers: one UNet call per evaluation, timed into unet_times."""
        unet, batch = self.sessions["unet"], conditions["encoder_hidden_states"].shape[0]

        def eps_fn(x_in: np.ndarray, t: float) -> np.ndarray:
            self.latest_sample = x_in
            sample = np.concatenate([x_in, x_in]) if cfg else x_in  # (2n|n, C, h, w)
            if extra is not None:
                sample = np.concatenate([sample, extra], axis=1)  # latents, mask, masked-image latents
            t1 = time.perf_counter()
            out = unet.run({"sample": sample, "timestep": np.full((batch,), t, np.float32), **conditions})["noise_pred"]
            unet_times.append(time.perf_counter() - t1)
            if not cfg:
                return out
            uncond, cond = out[:n], out[n:]
            return uncond + guidance * (cond - uncond)

        return eps_fn

    @staticmethod
    def _check_latents(latents: np.ndarray) -> None:
        if not np.isfinite(latents).all():
            raise NonFiniteOutput(
                "unet produced NaN/inf latents; with FP16 engines try the FP32 bundle or a "
                "lower guidance_scale, and report the checkpoint"
            )

    def _decode(self, latents: np.ndarray, timings: dict[str, float], key: str = "vae_decoder") -> np.ndarray:
        """Pixels (n, 3, H, W) in [0, 1] of VP latents."""
        t0 = time.perf_counter()
        decoded = self.sessions["vae_decoder"].run({"latent": latents / self.manifest.model.scaling_factor})["image"]
        timings[key] = time.perf_counter() - t0
        if not np.isfinite(decoded).all():
            raise NonFiniteOutput(
                "vae_decoder produced NaN/inf pixels; FP16 VAE overflow — use the FP32 bundle "
                "(ort-cpu) or a VAE with FP32 islands"
            )
        return np.clip(decoded / 2 + 0.5, 0.0, 1.0)

    def _upscale(self, images: np.ndarray, timings: dict[str, float], key: str = "upscaler") -> np.ndarray:
        """The bundle's upscaler over overlapping tiles: (n, 3, sH, sW) in [0, 1]."""
        from diffrt.engine.upscale import upscale_tiled

        info, session = self.manifest.upscaler, self.sessions["upscaler"]
        t0 = time.perf_counter()
        images = upscale_tiled(
            lambda tile: session.run({"image": tile})["upscaled"],
            images,
            info.scale,
            tile=info.tile,
            overlap=info.overlap,
            size_multiple=info.size_multiple,
        )
        timings[key] = time.perf_counter() - t0
        return np.clip(images, 0.0, 1.0)

    def _second_pass(self, r: Request):
        """(schedule, height, width) of the hires pass."""
        h = r.hires
        height, width = hires_size(self.manifest, r.height, r.width, h.scale)
        steps = h.steps or r.num_inference_steps
        schedule = make_schedule(r.scheduler, self.manifest.scheduler, steps, h.strength,
                                 strength_in_schedule(self.manifest))  # fmt: skip
        return schedule, height, width

    def _time_ids(self, r: Request, size: tuple[int, int], cfg: bool) -> np.ndarray:
        """SDXL's micro-conditioning rows for an image of `size` (the request's own sizes where it set them)."""
        width = self.unet_inputs["time_ids"].shape[1]
        aesthetic = (r.aesthetic_score, r.negative_aesthetic_score)
        original, target = r.original_size or size, r.target_size or size
        return time_ids(original, r.crops_coords_top_left, target, r.num_images, cfg, width, aesthetic)

    def _hires(self, r: Request, latents, second, conditions, cfg, timings, callback) -> np.ndarray:
        """A1111's hires fix: the first pass's latents brought to the target size, denoised again from the first
        kept step with fresh noise from the same seeds (each image's generator drawn again from the start)."""
        schedule, height, width = second
        f, up = self.manifest.model.vae_scale_factor, r.hires.upscaler
        rngs = [np.random.default_rng(s) for s in r.seeds]

        def draw(shape: tuple[int, ...]) -> np.ndarray:
            return np.concatenate([g.standard_normal((1, *shape[1:]), dtype=np.float32) for g in rngs])

        t0 = time.perf_counter()
        if up == "esrgan":  # pixels: decode, upscale, LANCZOS to the exact target, encode (posterior per image)
            pixels = self._upscale(self._decode(latents, timings, "hires_vae_decoder"), timings, "hires_upscaler")
            parts = []
            for i, im in enumerate(pixels):
                picture = to_pil(im.transpose(1, 2, 0))
                eps = rngs[i].standard_normal((1, latents.shape[1], height // f, width // f), dtype=np.float32)
                parts.append(self._encode(init_image_array(picture, height, width), eps, timings, "hires_vae_encoder"))
            z = np.concatenate(parts)
        else:
            z = resize_latents(latents, height // f, width // f, up)
        timings["hires_upscale"] = time.perf_counter() - t0
        if "time_ids" in conditions:  # SDXL: the second pass's own size, unless the request set them
            conditions = {**conditions, "time_ids": self._time_ids(r, (height, width), cfg)}
        unet_times: list[float] = []
        eps_fn = self._eps_fn(conditions, cfg, r.num_images, r.guidance_scale, None, unet_times)
        x = initial(schedule, draw(z.shape), z)
        t0 = time.perf_counter()
        latents = denoise(schedule, eps_fn, x, draw, callback)
        timings["hires_denoise"] = time.perf_counter() - t0
        timings["hires_unet"] = sum(unet_times)
        self._check_latents(latents)
        return latents

    def _refine(self, r: Request, latents: np.ndarray, draw, timings: dict[str, float], callback) -> np.ndarray:
        """As refiner: carry the base's VP latents on from refiner_at to the end of the schedule with this model's
        text encoders, time ids and scheduler config, drawing step noise from the base's generators (diffusers'
        img2img with denoising_start, the latents handed over without decoding or added noise)."""
        m, own = self.manifest.model, {}
        cfg = r.guidance_scale > 1.0 and m.classifier_free_guidance
        prompts = Prompts(list(r.prompts), list(r.prompt_2), r.negative_prompt, r.negative_prompt_2)
        conditions = text_conditioning(
            self.text_encoders,
            prompts,
            cfg,
            m.force_zeros_for_empty_prompt,
            own,
            r.prompt_syntax,
            self.max_chunks,
            r.clip_skip,
        )
        if "time_ids" in self.unet_inputs:
            conditions["time_ids"] = self._time_ids(r, (r.height, r.width), cfg)
        schedule = make_schedule(r.scheduler, self.manifest.scheduler, r.num_inference_steps, start=r.refiner_at)
        unet_times: list[float] = []
        eps_fn = self._eps_fn(conditions, cfg, r.num_images, r.guidance_scale, None, unet_times)
        t0 = time.perf_counter()
        latents = denoise(schedule, eps_fn, from_vp(schedule, latents), draw, callback)
        own.update(denoise=time.perf_counter() - t0, unet=sum(unet_times))
        timings.update({f"refiner_{k}": v for k, v in own.items()})
        self._check_latents(latents)
        return latents

    def _generate(self, r: Request, callback: Callable[[int, int], None] | None) -> PipelineOutput:
        start = time.perf_counter()
        m = self.manifest.model
        if r.upscale and not self.has_upscaler and not self._warned_no_upscaler:
            log.info("bundle has no upscaler: images stay at %dx%d", r.width, r.height)
            self._warned_no_upscaler = True
        timings: dict[str, float] = {}
        n = r.num_images
        # at <= 1 the unconditional half changes nothing: skip it; LCM takes guidance as an input instead
        cfg = r.guidance_scale > 1.0 and m.classifier_free_guidance
        prompts = Prompts(list(r.prompts), list(r.prompt_2), r.negative_prompt, r.negative_prompt_2)
        conditions = text_conditioning(
            self.text_encoders,
            prompts,
            cfg,
            m.force_zeros_for_empty_prompt,
            timings,
            r.prompt_syntax,
            self.max_chunks,
            r.clip_skip,
        )
        batch = conditions["encoder_hidden_states"].shape[0]  # (2n|n, 77 k, D)
        if "time_ids" in self.unet_inputs:
            conditions["time_ids"] = self._time_ids(r, (r.height, r.width), cfg)
        if "timestep_cond" in self.unet_inputs:
            width = self.unet_inputs["timestep_cond"].shape[1]
            conditions["timestep_cond"] = guidance_embedding(r.guidance_scale, width, batch)  # (2n|n, W)

        f, c = m.vae_scale_factor, m.latent_channels
        one = (1, c, r.height // f, r.width // f)
        rngs = [np.random.default_rng(s) for s in r.seeds]

        def draw(shape: tuple[int, ...] = one) -> np.ndarray:  # one draw per image generator, stacked
            return np.concatenate([g.standard_normal((1, *shape[1:]), dtype=np.float32) for g in rngs])

        schedule = make_schedule(r.scheduler, self.manifest.scheduler, r.num_inference_steps, r.strength,
                                 strength_in_schedule(self.manifest))  # fmt: skip
        nine = self.manifest.inpainting_unet
        inpaint, full = r.mask_image is not None, r.strength == 1.0
        z = None  # the init image's latents: image to image, and the known region of 4-channel inpainting
        if r.image is not None and not (nine and full):
            z = self._encode(r.image, draw(), timings)
        eps = r.latents if r.latents is not None else draw()
        after, extra = None, None
        if inpaint:
            posterior = draw()  # diffusers encodes the masked image for 4-channel UNets too: same stream
            mask = r.mask_image[:, :, ::f, ::f]  # nearest onto the latent grid (1, 1, h, w)
            if nine:
                masked = self._encode(r.image * (r.mask_image < 0.5), posterior, timings)  # (n, C, h, w)
                extra = np.concatenate([np.broadcast_to(mask, (n, 1, *one[2:])), masked], axis=1)
                extra = np.concatenate([extra, extra]) if cfg else extra  # (2n|n, 1 + C, h, w)
            else:
                after = keep_known(schedule, z, eps, mask)
        x = initial(schedule, eps) if z is None or (inpaint and full) else initial(schedule, eps, z)

        unet_times: list[float] = []
        eps_fn = self._eps_fn(conditions, cfg, n, r.guidance_scale, extra, unet_times)
        second = self._second_pass(r) if r.hires is not None else None
        end = None
        if self.refiner is not None:  # the base runs the steps before refiner_at, the refiner the rest
            end = handoff_step(r.scheduler, schedule.timesteps, r.refiner_at, len(schedule.alphas_cumprod))
        calls = (end or schedule.model_calls, schedule.model_calls - end if end else 0)
        if second is not None:
            calls = (calls[0], second[0].model_calls)
        t0 = time.perf_counter()
        latents = denoise(schedule, eps_fn, x, draw, _offset(callback, 0, sum(calls)), after, end)
        timings["denoise"] = time.perf_counter() - t0  # the whole loop: UNet calls + sampler/CFG host work
        timings["unet"] = sum(unet_times)
        self._check_latents(latents)
        upscaled = None
        later = _offset(callback, calls[0], sum(calls))
        if second is not None:
            latents = self._hires(r, latents, second, conditions, cfg, timings, later)
        decoder = self
        if self.refiner is not None:
            latents = self.refiner._refine(r, latents, draw, timings, later)
            decoder = self.refiner  # diffusers' refiner pipeline decodes with its own VAE
        images = decoder._decode(latents, timings)
        if r.paste_back:  # A1111's overlay: the original outside the (blurred) mask
            alpha = blurred(r.mask_image, r.mask_blur)
            images = (r.image / 2 + 0.5) * (1.0 - alpha) + images * alpha
        if r.upscale and self.has_upscaler:
            images = self._upscale(images, timings)
            upscaled = f"{self.manifest.upscaler.architecture} x{self.manifest.upscaler.scale}"
        timings["total"] = time.perf_counter() - start

        out = to_hwc(images)
        if r.output_type == "pil":
            out = [to_pil(im) for im in out]
        parameters = {
            **r.parameters(),
            "upscaled": upscaled,
            **({"prompt_2": r.prompt_2[0]} if len(self.text_encoders) > 1 else {}),
            "model_hash": self.manifest.source.get("sha256", ""),
            **({"refiner_hash": self.refiner.manifest.source.get("sha256", "")} if self.refiner else {}),
        }
        if r.loras:
            parameters["loras"] = [{"name": f.name.removesuffix(SUFFIX), "scale": s, "hash": self._lora_file(f)[1]}
                                   for f, s in r.loras]  # fmt: skip
        return PipelineOutput(out, timings, unet_times, parameters)
