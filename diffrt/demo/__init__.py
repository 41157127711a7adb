"""The built-in demo: a small model diffrt trained itself (diffrt/demo/train.py) on the scene world of
diffrt/demo/scenes.py, plus real Real-ESRGAN weights, exported to a bundle on first use.

`diffrt generate demo "a red circle on the left on a blue background"` resolves the word `demo` here.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from diffrt.errors import BadInput

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
CHECKPOINT = HERE / "checkpoint"  # diffusers folder, FP16 weights
UPSCALER = HERE / "upscaler" / "REALESRGAN_ANIMAVIDEOV3_UP4X.param"  # + .bin beside it
# The demo bundle's generation defaults, recorded in its manifest: a model this small follows prompts best at low
# guidance (docs/demo.md has the sweep these come from).
DEMO_DEFAULTS = {"num_inference_steps": 20, "guidance_scale": 2.0, "scheduler": "dpmpp_2m"}


def cache_dir() -> Path:
    """Where built bundles are kept: $DIFFRT_CACHE, else $XDG_CACHE_HOME/diffrt, else ~/.cache/diffrt."""
    if os.environ.get("DIFFRT_CACHE"):
        return Path(os.environ["DIFFRT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "diffrt"


def _key() -> str:
    """Hash of the shipped files, the bundle schema and the defaults: any change gets a fresh bundle."""
    from diffrt.bundle import SCHEMA_VERSION

    h = hashlib.sha256(f"schema {SCHEMA_VERSION} {sorted(DEMO_DEFAULTS.items())}".encode())
    files = sorted(p for p in (*CHECKPOINT.rglob("*"), *UPSCALER.parent.iterdir()) if p.is_file())
    for path in files:
        h.update(path.relative_to(HERE).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def demo_is_built() -> bool:
    return (cache_dir() / f"demo-{_key()}" / "manifest.json").is_file()


def demo_bundle() -> Path:
    """The demo bundle's directory, exported (and validated) on first use."""
    if not (CHECKPOINT / "model_index.json").is_file():
        raise BadInput(f"the demo checkpoint is missing from this installation ({CHECKPOINT}); reinstall diffrt")
    bundle = cache_dir() / f"demo-{_key()}"
    if (bundle / "manifest.json").is_file():
        return bundle
    try:
        import torch  # noqa: F401

        from diffrt.export.bundle_writer import ExportOptions, export_bundle
    except ImportError:
        raise BadInput(
            "the demo bundle is built on first use, which needs the export extra: pip install 'diffrt[export]'"
        ) from None
    log.info("building the demo bundle once (about a minute) into %s", bundle)
    bundle.parent.mkdir(parents=True, exist_ok=True)
    export_bundle(str(CHECKPOINT), bundle, upscaler=UPSCALER, opts=ExportOptions(force=True, defaults=DEMO_DEFAULTS))
    return bundle
