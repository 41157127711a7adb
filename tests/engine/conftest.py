"""Engine test fixtures shared by the sampler parity tests."""

from types import SimpleNamespace

import numpy as np
import pytest


def _quad(f, a, b, **_):
    """Gauss-Legendre stand-in for scipy.integrate.quad when scipy is absent: exact for LMS's cubic integrands."""
    nodes, weights = np.polynomial.legendre.leggauss(8)
    a, b = float(a), float(b)
    mid, half = (a + b) / 2, (b - a) / 2
    return half * sum(w * float(f(mid + half * x)) for x, w in zip(nodes, weights)), 0.0


@pytest.fixture
def injected_noise(monkeypatch):
    """diffusers' step noise comes from a NumPy stream; `ours()` returns the same stream for diffrt."""
    import torch
    from diffusers.schedulers import (
        scheduling_dpmsolver_multistep,
        scheduling_euler_ancestral_discrete,
        scheduling_lcm,
        scheduling_lms_discrete,
    )

    seed = 1234
    stream = np.random.default_rng(seed)

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        return torch.from_numpy(stream.standard_normal(tuple(shape), dtype=np.float32))

    for module in (scheduling_euler_ancestral_discrete, scheduling_dpmsolver_multistep, scheduling_lcm):
        monkeypatch.setattr(module, "randn_tensor", randn_tensor)
    if not hasattr(scheduling_lms_discrete, "integrate"):  # diffusers' LMS needs scipy only for this integral
        monkeypatch.setattr(scheduling_lms_discrete, "integrate", SimpleNamespace(quad=_quad), raising=False)

    def ours():
        rng = np.random.default_rng(seed)
        return lambda shape: rng.standard_normal(shape, dtype=np.float32)

    return ours
