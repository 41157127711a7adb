"""Session fixtures: tiny seeded checkpoints (built by tests/builders) and the bundles exported from them."""

import os
import tempfile

# Never reach for the hub, and keep libraries' caches out of the user's home.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HOME", os.path.join(tempfile.gettempdir(), "diffrt-test-hf-home"))

import shutil  # noqa: E402

import pytest  # noqa: E402

from tests.builders.sd import build_sd, to_inpainting  # noqa: E402

_GRAPHS = None


def pytest_configure(config):
    """One graph cache for the run (diffrt.export.graph_cache): fixtures that export a component again from the
    same weights (the single-file round trips, the bundle with an upscaler, broken-VAE copies) reuse its graphs
    and still validate them. Tests of the exporter itself that must trace set their own cache or none."""
    global _GRAPHS
    if "DIFFRT_GRAPH_CACHE" not in os.environ:
        _GRAPHS = tempfile.mkdtemp(prefix="diffrt-test-graphs-")
        os.environ["DIFFRT_GRAPH_CACHE"] = _GRAPHS


def pytest_unconfigure(config):
    if _GRAPHS is not None:
        os.environ.pop("DIFFRT_GRAPH_CACHE", None)
        shutil.rmtree(_GRAPHS, ignore_errors=True)


@pytest.fixture(scope="session")
def sd1_folder(tmp_path_factory):
    """Tiny SD1-style diffusers folder: epsilon, conv projections, CLIP-style text encoder."""
    return build_sd(tmp_path_factory.mktemp("ckpt") / "tiny-sd1", "sd1", seed=0)


@pytest.fixture(scope="session")
def sd2_folder(tmp_path_factory):
    """Tiny SD2-style diffusers folder: v-prediction, linear projections, upcast attention, '!' padding."""
    return build_sd(tmp_path_factory.mktemp("ckpt") / "tiny-sd2", "sd2", seed=1)


def _export(folder, out, **kw):
    from diffrt.export.bundle_writer import ExportOptions, export_bundle

    return export_bundle(str(folder), out, opts=ExportOptions(**kw))


@pytest.fixture(scope="session")
def sd1_export(sd1_folder, tmp_path_factory):
    """(bundle path, ExportResult) of the tiny SD1 checkpoint, validated."""
    out = tmp_path_factory.mktemp("bundle") / "sd1"
    return out, _export(sd1_folder, out)


@pytest.fixture(scope="session")
def sd2_export(sd2_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "sd2"
    return out, _export(sd2_folder, out)


@pytest.fixture(scope="session")
def sd1_bundle(sd1_export):
    return sd1_export[0]


@pytest.fixture(scope="session")
def sd2_bundle(sd2_export):
    return sd2_export[0]


@pytest.fixture(scope="session")
def sd1_upscaled_bundle(sd1_folder, tmp_path_factory):
    """The tiny SD1 checkpoint exported with a tiny x4 ESRGAN (old key layout, .pth)."""
    from diffrt.export.bundle_writer import ExportOptions, export_bundle
    from tests.builders.upscaler import build_esrgan_old

    root = tmp_path_factory.mktemp("bundle")
    weights = build_esrgan_old(root / "esrgan.pth", seed=5)
    export_bundle(str(sd1_folder), root / "sd1-up", upscaler=weights, opts=ExportOptions())
    return root / "sd1-up"


@pytest.fixture(scope="session")
def sdxl_folder(tmp_path_factory):
    """Tiny SDXL diffusers folder: two text encoders, added text/time conditions, force_zeros_for_empty_prompt."""
    from tests.builders.sdxl import build_sdxl

    return build_sdxl(tmp_path_factory.mktemp("ckpt") / "tiny-sdxl", seed=2)


@pytest.fixture(scope="session")
def sdxl_export(sdxl_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "sdxl"
    return out, _export(sdxl_folder, out)


@pytest.fixture(scope="session")
def sdxl_bundle(sdxl_export):
    return sdxl_export[0]


@pytest.fixture(scope="session")
def sdxl_refiner_folder(tmp_path_factory):
    """Tiny SDXL refiner (Stability's layout: the second text encoder alone, aesthetic-score time ids)."""
    from tests.builders.sdxl import build_sdxl_refiner

    return build_sdxl_refiner(tmp_path_factory.mktemp("ckpt") / "tiny-sdxl-refiner", seed=12)


@pytest.fixture(scope="session")
def sdxl_refiner_export(sdxl_refiner_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "sdxl-refiner"
    return out, _export(sdxl_refiner_folder, out)


@pytest.fixture(scope="session")
def sdxl_refiner_bundle(sdxl_refiner_export):
    return sdxl_refiner_export[0]


@pytest.fixture(scope="session")
def lcm_folder(tmp_path_factory):
    """Tiny LCM diffusers folder: SD1-style UNet with a guidance-embedding input, LCMScheduler; the text encoder
    and VAE are the SD1 fixture's (same seed), as LCM distils a base model's UNet only."""
    from tests.builders.sdxl import build_lcm

    return build_lcm(tmp_path_factory.mktemp("ckpt") / "tiny-lcm", seed=0)


@pytest.fixture(scope="session")
def lcm_export(lcm_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "lcm"
    return out, _export(lcm_folder, out)


@pytest.fixture(scope="session")
def lcm_bundle(lcm_export):
    return lcm_export[0]


@pytest.fixture(scope="session")
def sd1_inpaint_folder(sd1_folder, tmp_path_factory):
    """Tiny SD1 inpainting checkpoint: a 9-channel UNet (latents, mask, masked-image latents); the text encoder
    and VAE are the base's, as in the released inpainting checkpoints."""
    return to_inpainting(_copy(sd1_folder, tmp_path_factory, "tiny-sd1-inpaint"), seed=7)


def _copy(folder, tmp_path_factory, name):
    out = tmp_path_factory.mktemp("ckpt") / name
    shutil.copytree(folder, out)
    return out


@pytest.fixture(scope="session")
def sd1_inpaint_bundle(sd1_inpaint_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "sd1-inpaint"
    _export(sd1_inpaint_folder, out)
    return out


@pytest.fixture(scope="session")
def sd2_inpaint_folder(sd2_folder, tmp_path_factory):
    """Tiny SD2 inpainting checkpoint: v-prediction, 9-channel UNet, the base's text encoder and VAE."""
    return to_inpainting(_copy(sd2_folder, tmp_path_factory, "tiny-sd2-inpaint"), seed=11)


@pytest.fixture(scope="session")
def sd2_inpaint_bundle(sd2_inpaint_folder, tmp_path_factory):
    """Exported without the validation pass (the SD1 and SDXL inpainting exports validate the 9-channel UNet);
    the parity tests check its pictures against diffusers."""
    out = tmp_path_factory.mktemp("bundle") / "sd2-inpaint"
    _export(sd2_inpaint_folder, out, validate=False)
    return out


@pytest.fixture(scope="session")
def sdxl_inpaint_folder(sdxl_folder, tmp_path_factory):
    """Tiny SDXL inpainting checkpoint (StableDiffusionXLInpaintPipeline, 9-channel UNet), the base's encoders
    and VAE."""
    return to_inpainting(_copy(sdxl_folder, tmp_path_factory, "tiny-sdxl-inpaint"), seed=9)


@pytest.fixture(scope="session")
def sdxl_inpaint_bundle(sdxl_inpaint_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "sdxl-inpaint"
    _export(sdxl_inpaint_folder, out)
    return out
