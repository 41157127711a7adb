"""The single-file builder (tests/builders/single_file.py) writes what diffusers' own single-file converters read
back to the exact weights of the diffusers folder it came from, in the key layout of real SD 1.x / 2.x files."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from safetensors.torch import load_file  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from tests.builders.sd import build_sd  # noqa: E402
from tests.builders.single_file import to_single_file  # noqa: E402

DDPM_BUFFERS = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "posterior_variance", "posterior_mean_coef1"}


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def built(request, tmp_path_factory):
    """(flavour, diffusers folder, checkpoint path, checkpoint state dict)."""
    root = tmp_path_factory.mktemp(f"single-file-{request.param}")
    folder = build_sd(root / "diffusers", request.param, seed=0)
    path = to_single_file(folder, root / f"tiny-{request.param}.safetensors")
    return request.param, folder, path, load_file(path)


def _weights(folder):
    weights = {}
    for shard in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(shard))
    return weights


def _assert_same_weights(converted, original):
    assert sorted(converted) == sorted(original)
    for key, value in original.items():
        assert converted[key].shape == value.shape, key
        assert torch.equal(converted[key], value), key


def _flatten_clip(state, model):
    """transformers >= 5.6 flattened CLIPTextModel: no text_model. prefix (diffusers strips it the same way)."""
    return state if hasattr(model, "text_model") else {k.removeprefix("text_model."): v for k, v in state.items()}


def test_key_layout_looks_like_a_real_checkpoint(built):
    flavour, folder, _, ckpt = built
    for key in (
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.input_blocks.1.1.proj_in.weight",
        "model.diffusion_model.input_blocks.2.0.op.weight",
        "model.diffusion_model.input_blocks.3.0.skip_connection.weight",
        "model.diffusion_model.middle_block.2.out_layers.3.weight",
        "model.diffusion_model.output_blocks.1.1.conv.weight",
        "model.diffusion_model.time_embed.2.weight",
        "model.diffusion_model.out.2.weight",
        "first_stage_model.encoder.down.2.block.0.nin_shortcut.weight",
        "first_stage_model.encoder.mid.attn_1.q.weight",
        "first_stage_model.decoder.conv_in.weight",
        "first_stage_model.decoder.up.1.block.0.nin_shortcut.weight",
        "first_stage_model.decoder.up.3.upsample.conv.weight",
        "first_stage_model.post_quant_conv.weight",
        *DDPM_BUFFERS,
    ):
        assert key in ckpt, key
    assert "first_stage_model.decoder.up.0.upsample.conv.weight" not in ckpt  # the last (full-resolution) level
    assert ckpt["first_stage_model.decoder.mid.attn_1.proj_out.weight"].shape == (64, 64, 1, 1)
    proj_in = ckpt["model.diffusion_model.input_blocks.1.1.proj_in.weight"]
    assert proj_in.ndim == (2 if flavour == "sd2" else 4)  # linear (SD2) or 1x1 conv (SD1) projections
    text = CLIPTextConfig.from_pretrained(folder / "text_encoder")
    prefixes = ["model.diffusion_model.", "first_stage_model."]
    if flavour == "sd1":
        prefixes.append("cond_stage_model.transformer.text_model.")
        assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in ckpt
        assert ckpt["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == torch.int64
    else:
        prefixes.append("cond_stage_model.model.")
        open_clip = "cond_stage_model.model."
        n, width = text.num_hidden_layers, text.hidden_size
        assert ckpt[open_clip + "transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * width, width)
        for key in ("token_embedding.weight", "positional_embedding", "ln_final.weight", "logit_scale"):
            assert open_clip + key in ckpt, key
        assert ckpt[open_clip + "text_projection"].shape == (width, text.projection_dim)
        # One resblock more than diffusers' text encoder: the original's last layer, which SD2 skips.
        assert open_clip + f"transformer.resblocks.{n}.mlp.c_proj.weight" in ckpt
        assert not any(k.startswith(open_clip + f"transformer.resblocks.{n + 1}.") for k in ckpt)
    others = {k for k in ckpt if not k.startswith(tuple(prefixes))}  # LDM's DDPM schedule buffers
    assert others >= DDPM_BUFFERS and all(ckpt[k].shape == (1000,) for k in others), sorted(others)


def test_unet_round_trip(built):
    _, folder, _, ckpt = built
    config = UNet2DConditionModel.load_config(folder / "unet")
    converted = convert_ldm_unet_checkpoint(ckpt, config)
    _assert_same_weights(converted, _weights(folder / "unet"))
    model = UNet2DConditionModel.from_config(config).eval()
    model.load_state_dict(converted, strict=True)
    reference = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=gen)
    context = torch.randn(2, 7, config["cross_attention_dim"], generator=gen)
    with torch.no_grad():
        got = model(sample, torch.tensor([10, 900]), context).sample
        want = reference(sample, torch.tensor([10, 900]), context).sample
    assert torch.equal(got, want)


def test_vae_round_trip(built):
    _, folder, _, ckpt = built
    config = AutoencoderKL.load_config(folder / "vae")
    converted = convert_ldm_vae_checkpoint(ckpt, config)
    _assert_same_weights(converted, _weights(folder / "vae"))
    model = AutoencoderKL.from_config(config).eval()
    model.load_state_dict(converted, strict=True)
    reference = AutoencoderKL.from_pretrained(folder / "vae").eval()
    gen = torch.Generator().manual_seed(0)
    image, latents = torch.rand(1, 3, 64, 64, generator=gen) * 2 - 1, torch.randn(1, 4, 8, 8, generator=gen)
    with torch.no_grad():
        assert torch.equal(model.decode(latents).sample, reference.decode(latents).sample)
        assert torch.equal(model.encode(image).latent_dist.mean, reference.encode(image).latent_dist.mean)


def test_text_encoder_round_trip(built):
    flavour, folder, _, ckpt = built
    config = CLIPTextConfig.from_pretrained(folder / "text_encoder")
    model = CLIPTextModel(config).eval()
    if flavour == "sd1":
        converted = _flatten_clip(convert_ldm_clip_checkpoint(ckpt), model)
        extra = {"embeddings.position_ids"}  # real SD1 files carry it; transformers keeps it non-persistent now
    else:
        converted = _flatten_clip(convert_open_clip_checkpoint(model, ckpt), model)
        # diffusers ignores SD2's last resblock only by its literal index 23 (SD_2_TEXT_ENCODER_KEYS_TO_IGNORE), so
        # the tiny model's extra resblock comes back as one layer too many: real loading drops unknown keys.
        extra = {k for k in converted if k.startswith(f"encoder.layers.{config.num_hidden_layers}.")}
        assert len(extra) == 16  # ln_1/ln_2/out_proj/c_fc/c_proj weight+bias, in_proj split into q/k/v weight+bias
    result = model.load_state_dict(converted, strict=False)
    assert result.missing_keys == []
    assert set(result.unexpected_keys) == extra
    _assert_same_weights({k: v for k, v in converted.items() if k not in extra}, _weights(folder / "text_encoder"))
    reference = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    ids = torch.randint(0, config.vocab_size - 2, (2, 77), generator=torch.Generator().manual_seed(0))
    ids[:, 0], ids[:, 9:] = config.bos_token_id, config.eos_token_id
    with torch.no_grad():
        got, want = model(ids, output_hidden_states=True), reference(ids, output_hidden_states=True)
    assert torch.equal(got.last_hidden_state, want.last_hidden_state)
    assert torch.equal(got.hidden_states[-2], want.hidden_states[-2])
    assert torch.equal(got.pooler_output, want.pooler_output)


def test_diffusers_from_single_file_loads_the_same_pipeline(built):
    """diffusers' real loading path (component configs from the folder) gets back the folder's weights."""
    from diffusers import StableDiffusionPipeline

    _, folder, path, _ = built
    pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(folder), local_files_only=True)
    for name in ("unet", "vae", "text_encoder"):
        _assert_same_weights(getattr(pipe, name).state_dict(), _weights(folder / name))


def test_deterministic(built, tmp_path):
    _, folder, path, _ = built
    assert to_single_file(folder, tmp_path / "again.safetensors").read_bytes() == path.read_bytes()


def test_real_sd_unet_layout(tmp_path):
    """SD 1.x's UNet shape (4 levels, 2 resnets each, attention in all but the deepest): the block numbering of the
    original files, upsamplers after an attention at index 2, and the keys diffusers sniffs the model type from."""
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES, infer_diffusers_model_type

    folder = build_sd(tmp_path / "diffusers", "sd1", seed=0)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=64,
        attention_head_dim=8,
    )
    unet.save_pretrained(folder / "unet")
    ckpt = load_file(to_single_file(folder, tmp_path / "tiny.safetensors"))
    unet_keys = {k.removeprefix("model.diffusion_model.").rsplit(".", 1)[0] for k in ckpt}
    for level in range(3):
        assert f"input_blocks.{3 * level + 3}.0.op" in unet_keys
        assert f"output_blocks.{3 * level + 2}.{1 if level == 0 else 2}.conv" in unet_keys
    assert {f"input_blocks.{i}.1.proj_in" for i in (1, 2, 4, 5, 7, 8)} <= unet_keys
    assert {f"output_blocks.{i}.1.proj_in" for i in range(3, 12)} <= unet_keys
    assert not {"input_blocks.10.1.proj_in", "output_blocks.2.1.proj_in"} & unet_keys
    assert CHECKPOINT_KEY_NAMES["v1"] in ckpt and infer_diffusers_model_type(ckpt) == "v1"
    _assert_same_weights(convert_ldm_unet_checkpoint(ckpt, dict(unet.config)), unet.state_dict())
