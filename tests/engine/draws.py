"""diffusers' random draws replaced by a NumPy stream, so a parity test's diffrt and diffusers runs draw the same
numbers in the same order."""

import importlib

import numpy as np


def inject_stream(monkeypatch, seed: int, modules: list[str]) -> None:
    """Every `randn_tensor` the named diffusers modules call draws from one `default_rng(seed)` stream, as one
    torch generator passed to every call would (diffrt: image i's generator)."""
    import torch

    stream = np.random.default_rng(seed)

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        return torch.from_numpy(stream.standard_normal(tuple(shape), dtype=np.float32))

    for name in modules:
        monkeypatch.setattr(importlib.import_module(name), "randn_tensor", randn_tensor)
