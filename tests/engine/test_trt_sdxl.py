"""TensorRT profiles for SDXL (second text encoder, pooled text and size conditions) and LCM (guidance input)
bundles, on CPU: the shapes come from the same specs the export writes."""

from __future__ import annotations

from dataclasses import replace

from diffrt.bundle import ModelInfo
from diffrt.engine.trt_build import BuildOptions, profile_shapes
from diffrt.specs import SDShapes, sd_specs

SDXL = SDShapes(
    vocab_size=49408, max_length=77, text_hidden=768, latent_channels=4, unet_out_channels=4, vae_scale_factor=8,
    unet_downsamples=2, image_opt=1024, image_min=512, image_max=1536, max_images=4, text_hidden_2=1280,
    vocab_size_2=49408, pooled_dim=1280, time_ids=6,
)  # fmt: skip
XL_MODEL = ModelInfo("sdxl", "epsilon", 4, 8, 0.13025, 1024, force_zeros_for_empty_prompt=True)
LCM = replace(SDXL, text_hidden_2=0, vocab_size_2=0, pooled_dim=0, time_ids=0, time_cond_dim=256, image_opt=512,
              image_min=256, image_max=1024, unet_downsamples=3)  # fmt: skip
LCM_MODEL = ModelInfo("sd1", "epsilon", 4, 8, 0.18215, 512, classifier_free_guidance=False)


def test_sdxl_static_profile_has_the_added_conditions_at_the_guided_batch():
    specs = sd_specs(SDXL)
    unet = profile_shapes(specs["unet"], BuildOptions(), XL_MODEL)
    assert unet == {
        "sample": ((2, 4, 128, 128),) * 3,
        "timestep": ((2,),) * 3,
        "encoder_hidden_states": ((2, 77, 2048), (2, 77, 2048), (2, 3 * 77, 2048)),
        "text_embeds": ((2, 1280),) * 3,
        "time_ids": ((2, 6),) * 3,
    }
    assert profile_shapes(specs["text_encoder_2"], BuildOptions(), XL_MODEL)["input_ids"] == ((2, 77),) * 3
    no_cfg = profile_shapes(specs["text_encoder_2"], BuildOptions(guidance=False), XL_MODEL)
    assert no_cfg["input_ids"] == ((1, 77),) * 3  # Turbo at guidance 0


def test_sdxl_dynamic_profile_spans_batch_and_sizes():
    unet = profile_shapes(sd_specs(SDXL)["unet"], BuildOptions(profile="dynamic", batch=(1, 2)), XL_MODEL)
    assert unet["time_ids"] == ((2, 6), (2, 6), (4, 6))
    assert unet["sample"] == ((2, 4, 64, 64), (2, 4, 128, 128), (4, 4, 192, 192))


def test_lcm_profiles_never_double_the_batch():
    """LCM takes guidance as a UNet input: no negative batch, whatever the build's guidance option says."""
    specs = sd_specs(LCM)
    unet = profile_shapes(specs["unet"], BuildOptions(), LCM_MODEL)
    assert unet["timestep_cond"] == ((1, 256),) * 3 and unet["sample"] == ((1, 4, 64, 64),) * 3
    assert profile_shapes(specs["text_encoder"], BuildOptions(), LCM_MODEL)["input_ids"] == ((1, 77),) * 3


def test_conditions_are_uploaded_once_per_generation_not_per_step():
    for shapes in (SDXL, LCM):
        unet = sd_specs(shapes)["unet"]
        steady = {t.name for t in unet.inputs if t.steady}
        assert steady == {t.name for t in unet.inputs} - {"sample", "timestep"}, steady
    assert "timestep_cond" in {t.name for t in sd_specs(LCM)["unet"].inputs if t.steady}
