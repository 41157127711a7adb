"""Component specs: one description per network, read by export, validation, TensorRT profiles and the runtime.

A spec names each tensor, its dtype and its shape in terms of symbolic dims ("batch", "latent_height", ...);
each symbolic dim has a (min, opt, max) range. Nothing else in diffrt repeats these shapes.
This module imports only numpy, so the runtime can read it without torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

from diffrt.errors import BadInput

Dim = int | str  # a fixed size, or the name of a symbolic dim
MAX_CLIP_SKIP = 12  # A1111's "Clip skip" goes from 1 (the usual layer) to 12
Sample = Literal["normal", "uniform", "timestep", "tokens", "size"]
COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder", "upscaler")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name as fed to / returned by the graph at its boundary
    shape: tuple[Dim, ...]
    sample: Sample = "normal"  # how sample inputs for validation and warm-up are drawn
    high: int = 0  # exclusive upper bound for "tokens" (the vocabulary size)
    steady: bool = False  # the same for every call of one generation (text, size ids): uploaded when it changes


@dataclass(frozen=True)
class DimRange:
    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"bad dim range {self}")


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: tuple[tuple[str, DimRange], ...]  # symbolic dim -> allowed range
    multiples: tuple[tuple[str, int], ...] = ()  # symbolic dim -> value must be a multiple of this
    derived: tuple[tuple[str, str, int], ...] = ()  # (dim, source, k): dim = k * source, never set on its own
    # How the pipeline calls it (TensorRT profiles, CUDA graphs and buffers follow these, not component names):
    cfg_batched: bool = False  # with classifier-free guidance it sees negative + positive rows, 2 x images
    per_step: bool = False  # called at every sampler step: worth a CUDA graph
    tiled: bool = False  # runs on tiles of the image: its shapes are tiles, profiles span the spec's ranges

    def all_dims(self, values: dict[str, int]) -> dict[str, int]:
        """The symbolic dims plus the derived dims that follow from them."""
        return {**values, **{d: values[src] * k for d, src, k in self.derived}}

    def dims_of(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
        """The symbolic dims of a set of input shapes (derived dims traced back to their sources)."""
        dims: dict[str, int] = {}
        for t in self.inputs:
            for d, n in zip(t.shape, shapes[t.name]):
                if isinstance(d, str):
                    dims[d] = int(n)
        for d, src, k in self.derived:
            if d in dims:
                dims.setdefault(src, dims.pop(d) // k)
        return dims

    @property
    def dim_ranges(self) -> dict[str, DimRange]:
        return dict(self.dims)

    @property
    def max_chunks(self) -> int:
        """Text-encoder windows the UNet's sequence may hold (1: a fixed sequence, as bundles before long prompts)."""
        r = self.dim_ranges.get("text_chunks")
        return r.max if r else 1

    def opt_dims(self) -> dict[str, int]:
        return {k: r.opt for k, r in self.dims}

    def shape(self, tensor: TensorSpec, values: dict[str, int]) -> tuple[int, ...]:
        values = self.all_dims(values) if self.derived else values
        return tuple(d if isinstance(d, int) else values[d] for d in tensor.shape)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """Axes that are symbolic, per tensor name (inputs and outputs)."""
        return {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)} for t in self.inputs + self.outputs}

    def check(self, values: dict[str, int]) -> None:
        """Raise BadInput when a symbolic dim is outside its range or not a multiple it must be."""
        ranges, multiples = self.dim_ranges, dict(self.multiples)
        for dim, value in values.items():
            r = ranges[dim]
            if not r.min <= value <= r.max:
                raise BadInput(
                    f"{self.name}: {dim}={value} is outside the bundle's range [{r.min}, {r.max}]; "
                    f"use a value in that range or re-export with a wider range"
                )
            m = multiples.get(dim, 1)
            if value % m:
                raise BadInput(f"{self.name}: {dim}={value} must be a multiple of {m}")

    def sample_inputs(self, values: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
        """Random inputs of the given symbolic dims, for validation and warm-up."""
        rng = np.random.default_rng(seed)
        out: dict[str, np.ndarray] = {}
        for t in self.inputs:
            shape = self.shape(t, values)
            if t.sample == "tokens":
                arr = rng.integers(0, t.high, size=shape)
            elif t.sample == "timestep":
                arr = rng.uniform(0, 999, size=shape)
            elif t.sample == "size":  # pixel sizes and offsets, as SDXL's time ids carry them
                arr = rng.integers(0, 1025, size=shape)
            elif t.sample == "uniform":
                arr = rng.uniform(0, 1, size=shape)
            else:
                arr = rng.standard_normal(size=shape)
            out[t.name] = arr.astype(t.dtype)
        return out

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ComponentSpec:
        def tensors(items: list[dict]) -> tuple[TensorSpec, ...]:
            return tuple(TensorSpec(**{**t, "shape": tuple(t["shape"])}) for t in items)

        return cls(
            name=d["name"],
            inputs=tensors(d["inputs"]),
            outputs=tensors(d["outputs"]),
            dims=tuple((k, DimRange(**r)) for k, r in d["dims"]),
            multiples=tuple((k, int(m)) for k, m in d.get("multiples", ())),
            derived=tuple((a, b, int(k)) for a, b, k in d.get("derived", ())),
            cfg_batched=bool(d.get("cfg_batched", False)),
            per_step=bool(d.get("per_step", False)),
            tiled=bool(d.get("tiled", False)),
        )


@dataclass(frozen=True)
class SDShapes:
    """What the specs of an SD 1.x/2.x/XL checkpoint depend on, read from its component configs.

    The SDXL and LCM fields default to 0, "absent": each one that is set adds a network input or output."""

    vocab_size: int
    max_length: int  # text tokens, 77 for CLIP
    text_hidden: int  # first text encoder width (0: none, the SDXL refiner); cross-attention is the sum over encoders
    latent_channels: int  # the VAE's
    unet_out_channels: int
    vae_scale_factor: int  # pixels per latent pixel, 8 for SD
    unet_downsamples: int  # latent size must be a multiple of 2**this
    image_opt: int  # the checkpoint's native image size (pixels)
    image_min: int
    image_max: int
    max_images: int = 4  # images per call; the UNet sees twice this with classifier-free guidance
    max_chunks: int = 3  # longest prompt, in text-encoder windows: the UNet's sequence is max_length x 1..this
    text_hidden_2: int = 0  # SDXL: width of the second (OpenCLIP bigG) text encoder
    vocab_size_2: int = 0
    pooled_dim: int = 0  # SDXL: pooled, projected text embedding of the second encoder -> UNet `text_embeds`
    time_ids: int = 0  # SDXL: micro-conditioning numbers (original size, crop top-left, target size) = 6
    time_cond_dim: int = 0  # LCM: width of the guidance-scale embedding -> UNet `timestep_cond`
    unet_in_channels: int = 0  # 0: latent_channels; inpainting UNets take latents + mask + masked latents (9)
    clip_skips: int = 0  # layers a text encoder can stop early by (`clip_skip` input 0 .. this - 1; 0: no input)
    clip_skips_2: int = 0

    @property
    def cross_attention_dim(self) -> int:
        return self.text_hidden + self.text_hidden_2


def _text_encoder_spec(name: str, vocab: int, s: SDShapes, hidden: int, pooled: int, skips: int) -> ComponentSpec:
    outputs = (TensorSpec("text_embeddings", "float32", ("batch", s.max_length, hidden)),)
    if pooled:
        outputs += (TensorSpec("text_embeds", "float32", ("batch", pooled)),)
    inputs = (
        TensorSpec("input_ids", "int32", ("batch", s.max_length), "tokens", vocab),
        # the rows of the token embedding table for input_ids, looked up by the runtime (bundle.token_table):
        # textual inversion adds rows at run time without touching the graph
        TensorSpec("token_embeds", "float32", ("batch", s.max_length, hidden)),
    )
    if skips:  # how many layers before the usual one the hidden states come from (diffusers' clip_skip)
        inputs += (TensorSpec("clip_skip", "int32", (1,), "tokens", skips),)
    return ComponentSpec(
        name=name,
        inputs=inputs,
        outputs=outputs,
        dims=(("batch", DimRange(1, 2, 2 * s.max_images)),),
        cfg_batched=True,
    )


def sd_specs(s: SDShapes) -> dict[str, ComponentSpec]:
    """Specs for the text encoder(s), UNet and VAE encoder and decoder. Latent dims derive from the image range."""
    f = s.vae_scale_factor
    mult = 2**s.unet_downsamples
    lat = DimRange(s.image_min // f, s.image_opt // f, s.image_max // f)
    unet_batch = DimRange(1, 2, 2 * s.max_images)
    latent = ("batch", s.latent_channels, "latent_height", "latent_width")
    spatial = (("latent_height", lat), ("latent_width", lat))
    # UNet inputs beyond SD 1.x's, present when their width is set (SDXL added conditions, LCM guidance)
    extra = tuple(
        TensorSpec(name, "float32", ("batch", width), sample, steady=True)
        for name, width, sample in (
            ("text_embeds", s.pooled_dim, "normal"),
            ("time_ids", s.time_ids, "size"),
            ("timestep_cond", s.time_cond_dim, "normal"),
        )
        if width
    )
    specs = {}
    if s.text_hidden:  # absent in the SDXL refiner, which the second encoder alone conditions
        specs["text_encoder"] = _text_encoder_spec("text_encoder", s.vocab_size, s, s.text_hidden, 0, s.clip_skips)
    if s.text_hidden_2:
        specs["text_encoder_2"] = _text_encoder_spec(
            "text_encoder_2", s.vocab_size_2, s, s.text_hidden_2, s.pooled_dim, s.clip_skips_2
        )
    unet_in = s.unet_in_channels or s.latent_channels
    specs["unet"] = ComponentSpec(
        name="unet",
        inputs=(
            TensorSpec("sample", "float32", ("batch", unet_in, "latent_height", "latent_width")),
            TensorSpec("timestep", "float32", ("batch",), "timestep"),
            TensorSpec("encoder_hidden_states", "float32", ("batch", "sequence", s.cross_attention_dim), steady=True),
            *extra,
        ),
        outputs=(TensorSpec("noise_pred", "float32", ("batch", s.unet_out_channels, "latent_height", "latent_width")),),
        # long prompts: each window of the text encoder adds max_length tokens to the cross-attention sequence
        dims=(("batch", unet_batch), *spatial, ("text_chunks", DimRange(1, 1, s.max_chunks))),
        multiples=(("latent_height", mult), ("latent_width", mult)),
        derived=(("sequence", "text_chunks", s.max_length),),
        cfg_batched=True,
        per_step=True,
    )
    image = ("batch", 3, "height", "width")
    pixels = (("height", "latent_height", f), ("width", "latent_width", f))
    images = (("batch", DimRange(1, 1, s.max_images)), *spatial)
    # the posterior's parameters: the runtime draws z = mean + exp(logvar / 2) eps itself (diffusers samples),
    # one draw per image of the call from one encoding of the init image: its batch is always 1
    specs["vae_encoder"] = ComponentSpec(
        name="vae_encoder",
        inputs=(TensorSpec("image", "float32", image, "uniform"),),
        outputs=(TensorSpec("latent_mean", "float32", latent), TensorSpec("latent_logvar", "float32", latent)),
        dims=(("batch", DimRange(1, 1, 1)), *spatial),
        multiples=(("latent_height", mult), ("latent_width", mult)),
        derived=pixels,
    )
    specs["vae_decoder"] = ComponentSpec(
        name="vae_decoder",
        inputs=(TensorSpec("latent", "float32", latent),),
        outputs=(TensorSpec("image", "float32", image),),
        dims=images,
        multiples=(("latent_height", mult), ("latent_width", mult)),
        derived=pixels,
    )
    return specs


def upscaler_spec(scale: int, tile: int, size_multiple: int = 1) -> ComponentSpec:
    """Spec of an image-to-image upscaler: (B, 3, H, W) in [0, 1] -> (B, 3, sH, sW), run on tiles."""
    m = max(size_multiple, 1)
    lo = max(m, 16 // m * m)
    side = DimRange(lo, tile, 4 * tile)
    return ComponentSpec(
        name="upscaler",
        inputs=(TensorSpec("image", "float32", ("batch", 3, "height", "width"), "uniform"),),
        outputs=(TensorSpec("upscaled", "float32", ("batch", 3, "out_height", "out_width")),),
        dims=(("batch", DimRange(1, 1, 4)), ("height", side), ("width", side)),
        multiples=(("height", m), ("width", m)),
        derived=(("out_height", "height", scale), ("out_width", "width", scale)),
        tiled=True,
    )
