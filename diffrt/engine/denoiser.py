"""The denoiser contract between the samplers and the network.

Samplers see `denoised = model(x, sigma)` in k-diffusion's variance-exploding (VE) space, x = x0 + sigma * eps.
The network is a VP model: it wants the sample scaled to unit variance, c_in = 1 / sqrt(sigma^2 + 1), and the
training timestep of that noise level, and it predicts epsilon, v or x0. `Denoiser` owns that translation
(Karras et al. 2022, section 5 / table 1, "VP" preconditioning).

DDIM, PNDM and LCM are written in diffusers' own alpha-bar form instead, through `output` and `split`: DDIM and
PNDM jump to `t - num_train_timesteps // steps`, which need not be the next timestep of the schedule (so the
chain is not one VE trajectory), PNDM averages raw v-predictions before converting them, and LCM's boundary
scalings act on the VP sample; reproducing diffusers there is simplest in its own variables.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from diffrt.engine.schedules import Schedule, sigma_to_t

EpsFn = Callable[[np.ndarray, float], np.ndarray]  # (x_in (B, C, h, w) float32, timestep) -> raw network output


class Denoiser:
    """VE denoiser D(x; sigma) around an epsilon / v / sample-predicting VP network (Karras et al. 2022)."""

    def __init__(self, eps_fn: EpsFn, schedule: Schedule, callback: Callable[[int, int], None] | None = None):
        self.eps_fn = eps_fn
        self.prediction_type = schedule.prediction_type
        self.clip = schedule.clip_sample_range
        # diffusers pairs each sigma with a precomputed timestep (rounded, for DPM-Solver's Karras schedule):
        # use that exact value, not a re-interpolation
        self._timestep = {float(s): float(t) for s, t in zip(schedule.sigmas[:-1], schedule.timesteps)}
        with np.errstate(divide="ignore"):
            self._log_sigmas = np.log(np.sqrt((1.0 - schedule.alphas_cumprod) / schedule.alphas_cumprod))
        self.callback, self.total, self.calls = callback, schedule.model_calls, 0

    def timestep(self, sigma: float) -> float:
        """The model timestep for a noise level: the schedule's own, else log-sigma interpolation (k-diffusion)."""
        t = self._timestep.get(sigma)
        return t if t is not None else float(sigma_to_t(np.asarray(sigma, np.float64), self._log_sigmas))

    def output(self, x_vp: np.ndarray, t: float) -> np.ndarray:
        """Raw network output for a VP sample at timestep t (one model step for the progress callback)."""
        out = np.asarray(self.eps_fn(x_vp, t), dtype=x_vp.dtype)
        if self.callback is not None:
            self.callback(self.calls, self.total)
        self.calls += 1
        return out

    def __call__(self, x: np.ndarray, sigma: float) -> np.ndarray:
        """Denoised estimate of the VE sample x at noise level sigma."""
        c_in = 1.0 / math.sqrt(sigma * sigma + 1.0)
        out = self.output(x * c_in, self.timestep(sigma))
        if self.prediction_type == "epsilon":
            denoised = x - out * sigma
        elif self.prediction_type == "v_prediction":  # x0 = alpha x_vp - sigma_vp v, with x_vp = c_in x
            denoised = x * (c_in * c_in) - out * (sigma * c_in)
        else:
            denoised = out
        return self._clip(denoised)

    def split(self, out: np.ndarray, x_vp: np.ndarray, alpha_bar: float) -> tuple[np.ndarray, np.ndarray]:
        """(x0, eps) from a raw output on VP sample x_vp at alpha-bar; x0 clipped as configured, eps not."""
        a, b = math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)
        if self.prediction_type == "epsilon":
            x0, eps = (x_vp - out * b) * (1.0 / a), out
        elif self.prediction_type == "v_prediction":
            x0, eps = x_vp * a - out * b, out * a + x_vp * b
        else:
            x0, eps = out, (x_vp - out * a) * (1.0 / b)
        return self._clip(x0), eps

    def _clip(self, x0: np.ndarray) -> np.ndarray:
        return x0 if self.clip is None else np.clip(x0, -self.clip, self.clip)
