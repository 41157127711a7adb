"""torch module + component spec -> FP32 ONNX graph with the spec's names and dynamic axes."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import onnx
import torch

from diffrt.specs import ComponentSpec

log = logging.getLogger(__name__)
EXTERNAL_DATA_BYTES = 500_000_000  # weights beside the graph above this: protobuf stops at 2 GB, and serialising
# a big graph in one piece holds a second copy in memory (3.4 GB for the FP16 SD 1.5 UNet)


class _GivenTokenEmbeddings(torch.nn.Module):
    """Stands in for CLIP's embedding layer: the token embeddings are the graph's input (`given`, set for each
    call), the position embeddings are the checkpoint's."""

    def __init__(self, embeddings: torch.nn.Module):
        super().__init__()
        self.position_embedding = embeddings.position_embedding
        self.given: torch.Tensor | None = None

    def forward(self, input_ids=None, position_ids=None, inputs_embeds=None):
        return self.given + self.position_embedding.weight[: self.given.shape[1]][None]


class TextEncoder(torch.nn.Module):
    """input_ids (B, 77) int32, token_embeds (B, 77, D) [, clip_skip (1,) int32] -> hidden states (B, 77, D) the
    UNet conditions on [, pooled projection (B, P)].

    token_embeds are the rows of the encoder's token embedding table for input_ids (`table`, saved beside the
    graph): the runtime looks them up, so textual inversion adds rows without a new graph; input_ids still
    place the pooled output (CLIP pools at the end-of-text token).
    SD 1.x/2.x take the last hidden state (after the final layer norm); SDXL takes both encoders' penultimate
    layer without it (`hidden_layer=-2`) and the second encoder's projected pooled output as `text_embeds`.
    With `skips`, `clip_skip` = k picks the hidden state k layers before that one, the final layer norm applied
    where the usual one has it (diffusers' clip_skip; A1111's "Clip skip" is k + 1); k < skips."""

    def __init__(self, text_encoder: torch.nn.Module, hidden_layer: int = -1, pooled: bool = False, skips: int = 0):
        super().__init__()
        self.text_encoder, self.hidden_layer, self.pooled, self.skips = text_encoder, hidden_layer, pooled, skips
        self.model = getattr(text_encoder, "text_model", text_encoder)  # transformers 5: CLIPTextModel is the model
        self.table = self.model.embeddings.token_embedding.weight.detach().float().numpy().copy()
        self.model.embeddings = self.given = _GivenTokenEmbeddings(self.model.embeddings)

    def forward(self, input_ids: torch.Tensor, token_embeds: torch.Tensor, clip_skip: torch.Tensor | None = None):
        self.given.given = token_embeds
        out = self.text_encoder(input_ids.long(), output_hidden_states=self.skips > 0 or self.hidden_layer != -1)
        self.given.given = None
        if self.skips:
            last = -1 if self.hidden_layer == -1 else self.hidden_layer
            layers = torch.stack([out.hidden_states[last - k] for k in range(self.skips)])
            hidden = layers.index_select(0, clip_skip.long()).squeeze(0)
            if self.hidden_layer == -1:
                hidden = self.model.final_layer_norm(hidden)
        else:
            hidden = out.last_hidden_state if self.hidden_layer == -1 else out.hidden_states[self.hidden_layer]
        return (hidden, out.text_embeds) if self.pooled else hidden


class UNet(torch.nn.Module):
    """(sample (B, C, h, w), timestep (B,), encoder_hidden_states (B, 77, D), *extra) -> output (B, C, h, w).

    `extra` are the inputs named in `extra_names`, in that order: SDXL's `text_embeds` (B, P) and `time_ids`
    (B, 6), LCM's `timestep_cond` (B, W)."""

    def __init__(self, unet: torch.nn.Module, extra_names: tuple[str, ...] = ()):
        super().__init__()
        if len(extra_names) > 3:
            raise ValueError(f"at most 3 extra UNet inputs, got {extra_names}")
        self.unet, self.extra_names = unet, extra_names

    def forward(self, sample, timestep, encoder_hidden_states, extra_1=None, extra_2=None, extra_3=None):
        # named parameters, not *args: torch.export matches dynamic shapes to the signature's flat inputs
        named = dict(zip(self.extra_names, (extra_1, extra_2, extra_3)))
        added = {k: named[k] for k in ("text_embeds", "time_ids") if k in named}
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states,
            timestep_cond=named.get("timestep_cond"),
            added_cond_kwargs=added or None,
            return_dict=False,
        )[0]


class VAEEncoder(torch.nn.Module):
    """Image (B, 3, H, W) in [-1, 1] -> the latent posterior's mean and log-variance (B, 4, H/8, W/8), unscaled.

    The sample z = scaling_factor * (mean + exp(logvar / 2) * eps) is drawn by the runtime, so that its noise
    comes from the request's generator (diffusers samples the posterior too)."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, image: torch.Tensor):
        moments = self.vae.encoder(image)
        if self.vae.quant_conv is not None:
            moments = self.vae.quant_conv(moments)
        mean, logvar = torch.chunk(moments, 2, dim=1)
        return mean, logvar


class VAEDecoder(torch.nn.Module):
    """Scaled-back latent (B, 4, h, w) -> image (B, 3, 8h, 8w) in about [-1, 1]."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent, return_dict=False)[0]


def export_example_dims(spec: ComponentSpec) -> dict[str, int]:
    """Trace at the opt shape but with batch 2: torch.export specialises dims it sees at size 1."""
    dims = spec.opt_dims()
    if "batch" in dims:
        dims["batch"] = max(2, dims["batch"])
    return dims


def export_onnx(module: torch.nn.Module, spec: ComponentSpec, path: Path, opset: int) -> None:
    """Export with torch's dynamo exporter to `path`; symbolic axes get the spec's dim names."""
    dims = export_example_dims(spec)
    args = tuple(torch.from_numpy(a) for a in spec.sample_inputs(dims).values())
    dynamic = tuple(
        {i: torch.export.Dim.DYNAMIC for i in axes} for axes in (spec.dynamic_axes()[t.name] for t in spec.inputs)
    )
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer chatter about python control flow on shapes
        program = torch.onnx.export(
            module.eval(),
            args,
            dynamo=True,
            opset_version=opset,
            dynamic_shapes=dynamic,
            input_names=[t.name for t in spec.inputs],
            output_names=[t.name for t in spec.outputs],
            optimize=True,
            verbose=False,
        )
    # Save straight from the exporter: it streams weights to disk, where building a ModelProto first would
    # hold a second copy (SD 1.5 UNet: 4.4 GB peak instead of 7.9 GB). Then rename dims on the graph only.
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path), external_data=None)  # external data only past protobuf's 2 GB
    del program
    model = onnx.load(str(path), load_external_data=False)
    name_dims(model, spec)
    onnx.save_model(model, str(path))  # weights stay where they are (inline, or in the .data file)


def name_dims(model: onnx.ModelProto, spec: ComponentSpec) -> None:
    """Give graph inputs/outputs the spec's symbolic dim names (the exporter invents its own)."""
    tensors = {t.name: t for t in spec.inputs + spec.outputs}
    for vi in list(model.graph.input) + list(model.graph.output):
        t = tensors.get(vi.name)
        if t is None:
            continue
        for d, want in zip(vi.type.tensor_type.shape.dim, t.shape):
            if isinstance(want, str):
                d.ClearField("dim_value")
                d.dim_param = want


def save_onnx(model: onnx.ModelProto, path: Path) -> None:
    """Save one graph; weights go to `<name>.data` beside it when the graph would pass protobuf's 2 GB.
    Saving with external data empties the in-memory weights: reload from `path` to use the graph again."""
    path.parent.mkdir(parents=True, exist_ok=True)
    big = model.ByteSize() > EXTERNAL_DATA_BYTES if _small_enough_to_measure(model) else True
    if big:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + ".data",
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(path))


def _small_enough_to_measure(model: onnx.ModelProto) -> bool:
    """ByteSize() itself fails past 2 GB; count raw initializer bytes first."""
    raw = sum(len(t.raw_data) for t in model.graph.initializer)
    return raw < EXTERNAL_DATA_BYTES
