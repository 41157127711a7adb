"""NumPy samplers, each reproducing one diffusers scheduler step for step (k-diffusion's style).

A sampler is a pure function `sample_x(model, x, sigmas, ...) -> x` over a precomputed schedule: `model(x, sigma)`
returns the denoised estimate in VE space (see `denoiser.py`), multistep history lives in local variables.
DDIM, PNDM and LCM take timesteps and alpha-bar instead (why: `denoiser.py`). Scalar coefficients are Python
floats computed in float64, so the array math stays in the latents' float32.

Image to image starts at the schedule's `begin` from `initial(schedule, eps, z)`, the init latents noised the way
diffusers' scheduler `add_noise` does. Every sampler takes `after(x, j)`, called once the sample has reached the
j-th noise level of its loop (j = steps: the end): inpainting with an ordinary UNet puts the known region back
there, as diffusers' inpainting pipelines do after each scheduler step. `denoise` runs a schedule and returns
VP latents for the VAE; `run_sampler` is text to image from unit noise in one call.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from diffrt.engine.denoiser import Denoiser, EpsFn
from diffrt.engine.schedules import DIFFUSERS_CLASS, Schedule, make_schedule
from diffrt.errors import BadInput

NoiseFn = Callable[[tuple[int, ...]], np.ndarray]  # shape -> standard-normal float32 draws
AfterFn = Callable[[np.ndarray, int], np.ndarray]  # (x at the loop's level j, j) -> x to carry on with
SAMPLERS = tuple(DIFFUSERS_CLASS)
STOCHASTIC = ("euler_a", "dpmpp_2m_sde_karras", "lcm")

_A1111 = {
    "DDIM": "ddim",
    "PLMS": "pndm",
    "Euler": "euler",
    "Euler a": "euler_a",
    "Heun": "heun",
    "LMS": "lms",
    "DPM++ 2M": "dpmpp_2m",
    "DPM++ 2M Karras": "dpmpp_2m_karras",
    "DPM++ 2M SDE Karras": "dpmpp_2m_sde_karras",
    "UniPC": "unipc",
    "LCM": "lcm",
}
_ALIASES = {
    **{k.lower(): k for k in SAMPLERS},
    **{
        cls.lower(): name
        for name, cls in DIFFUSERS_CLASS.items()
        if name not in ("dpmpp_2m_karras", "dpmpp_2m_sde_karras")
    },
    **{k.lower(): v for k, v in _A1111.items()},
}


def resolve_sampler(name: str) -> str:
    """Short sampler name for a short, diffusers class or A1111 name (case-insensitive)."""
    key = str(name).strip().lower()
    if key not in _ALIASES:
        raise BadInput(
            f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)} (or their diffusers class / A1111 names)"
        )
    return _ALIASES[key]


# A1111 (1.9 and later) names a sampler and a schedule type apart: "DPM++ 2M" + "Karras". "Automatic" is the
# sampler's own: Karras for the DPM++ 2M family (A1111's choice), the plain schedule for the rest.
A1111_SAMPLERS = tuple(name for name in _A1111 if not name.endswith(" Karras")) + ("DPM++ 2M SDE",)
A1111_SCHEDULERS = {"automatic": "Automatic", "uniform": "Uniform", "normal": "Normal", "karras": "Karras"}
_KARRAS_BY_DEFAULT = ("DPM++ 2M", "DPM++ 2M SDE")


def a1111_sampler(sampler_name: str | None, scheduler: str | None) -> str | None:
    """Short sampler name for A1111's sampler_name and scheduler (None: the bundle's default sampler)."""
    schedule = str(scheduler or "automatic").strip().lower()
    if schedule not in A1111_SCHEDULERS:
        raise BadInput(
            f"unknown scheduler {scheduler!r}; choose one of: {', '.join(A1111_SCHEDULERS.values())}", "scheduler"
        )
    if not sampler_name:
        return None
    name = {n.lower(): n for n in (*_A1111, "DPM++ 2M SDE")}.get(str(sampler_name).strip().lower())
    if name is None or name.endswith(" Karras"):  # a short or diffusers name, or A1111's older one-name form
        return resolve_sampler(sampler_name)
    if schedule == "karras" or (schedule == "automatic" and name in _KARRAS_BY_DEFAULT):
        if f"{name} Karras" not in _A1111:
            raise BadInput(f"scheduler Karras is not available with {name}; use it with DPM++ 2M", "scheduler")
        return _A1111[f"{name} Karras"]
    if name not in _A1111:  # "uniform", "normal": the plain schedule
        raise BadInput(f"{name} runs with the Karras schedule only; pass scheduler Karras", "scheduler")
    return _A1111[name]


def default_sampler(scheduler_config: Mapping[str, Any]) -> str:
    """The sampler for a bundle when the caller names none. Few-step distilled models (LCM, and Turbo's
    trailing-spaced schedulers) are tied to the scheduler they were distilled with; others get DPM++ 2M Karras."""
    cls = str(scheduler_config.get("_class_name", ""))
    own = _ALIASES.get(cls.lower())
    if own and (cls == "LCMScheduler" or scheduler_config.get("timestep_spacing") == "trailing"):
        return own
    return "dpmpp_2m_karras"


def _same(x: np.ndarray, j: int) -> np.ndarray:
    return x


def to_d(x: np.ndarray, sigma: float, denoised: np.ndarray) -> np.ndarray:
    """Probability-flow ODE derivative dx/dsigma in VE space (Karras et al. 2022, eq. 4)."""
    return (x - denoised) * (1.0 / sigma)


def get_ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step into a deterministic part down to sigma_down and fresh noise of std sigma_up."""
    up = min(sigma_to, eta * math.sqrt(max(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2, 0.0)))
    return math.sqrt(sigma_to**2 - up**2), up


def sample_euler(model: Denoiser, x: np.ndarray, sigmas: Sequence[float], after: AfterFn = _same) -> np.ndarray:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, algorithm 2 without churn)."""
    s = [float(v) for v in sigmas]
    for i in range(len(s) - 1):
        x = after(x + to_d(x, s[i], model(x, s[i])) * (s[i + 1] - s[i]), i + 1)
    return x


def sample_euler_ancestral(
    model: Denoiser, x: np.ndarray, sigmas: Sequence[float], noise: NoiseFn, after: AfterFn = _same
) -> np.ndarray:
    """Ancestral Euler (Song et al. 2021 reverse SDE, k-diffusion's Euler a with eta = 1)."""
    s = [float(v) for v in sigmas]
    for i in range(len(s) - 1):
        down, up = get_ancestral_step(s[i], s[i + 1])
        x = x + to_d(x, s[i], model(x, s[i])) * (down - s[i])
        # diffusers draws at every step, the last (sigma_up = 0) too: draw it to stay on the same noise stream
        x = after(x + noise(x.shape) * up, i + 1)
    return x


def sample_heun(model: Denoiser, x: np.ndarray, sigmas: Sequence[float], after: AfterFn = _same) -> np.ndarray:
    """Heun's second-order method (Karras et al. 2022, algorithm 1); an Euler step into sigma = 0. Both halves
    of a step end at level i + 1 (diffusers steps its scheduler, and inpainting blends, after each)."""
    s = [float(v) for v in sigmas]
    for i in range(len(s) - 1):
        d = to_d(x, s[i], model(x, s[i]))
        dt = s[i + 1] - s[i]
        if s[i + 1] == 0:
            x = after(x + d * dt, i + 1)
        else:
            x2 = after(x + d * dt, i + 1)
            x = after(x + (d + to_d(x2, s[i + 1], model(x2, s[i + 1]))) * (0.5 * dt), i + 1)
    return x


@functools.lru_cache(maxsize=8)
def _gauss_legendre(n: int) -> tuple[tuple[float, float], ...]:
    return tuple(zip(*(v.tolist() for v in np.polynomial.legendre.leggauss(n))))


def lms_coefficient(sigmas: Sequence[float], i: int, j: int, order: int) -> float:
    """Integral over [sigma_i, sigma_i+1] of the Lagrange basis polynomial of node sigma_(i-j).

    Gauss-Legendre with ceil(order / 2) points is exact for this degree order - 1 polynomial.
    """
    nodes = [sigmas[i - k] for k in range(order)]
    a, b = sigmas[i], sigmas[i + 1]
    mid, half = 0.5 * (a + b), 0.5 * (b - a)
    total = 0.0
    for u, w in _gauss_legendre(max(1, (order + 1) // 2)):
        tau = mid + half * u
        total += w * math.prod((tau - v) / (nodes[j] - v) for k, v in enumerate(nodes) if k != j)
    return half * total


def sample_lms(
    model: Denoiser, x: np.ndarray, sigmas: Sequence[float], order: int = 4, begin: int = 0, after: AfterFn = _same
) -> np.ndarray:
    """Linear multistep (Adams-Bashforth in sigma, up to `order` past derivatives; k-diffusion's LMS).

    Takes the whole chain and starts at step `begin`: as in diffusers, the coefficients are those of order
    min(i + 1, order) at absolute step i, applied to the derivatives this run has (fewer, after a late start)."""
    s = [float(v) for v in sigmas]
    ds: list[np.ndarray] = []
    for i in range(begin, len(s) - 1):
        ds = [to_d(x, s[i], model(x, s[i])), *ds][:order]  # newest first
        k = min(i + 1, order)
        x = after(x + sum(lms_coefficient(s, i, j, k) * d for j, d in enumerate(ds)), i + 1 - begin)
    return x


def sample_dpmpp_2m(
    model: Denoiser,
    x: np.ndarray,
    sigmas: Sequence[float],
    noise: NoiseFn | None = None,
    solver_type: str = "midpoint",
    final_first_order: bool = True,
    after: AfterFn = _same,
) -> np.ndarray:
    """DPM-Solver++(2M) (Lu et al. 2022) in VE form with lambda = -log sigma; with `noise`, its SDE variant."""
    s = [float(v) for v in sigmas]
    n = len(s) - 1
    old, h_last = None, 0.0
    for i in range(n):
        denoised = model(x, s[i])
        z = noise(x.shape) if noise is not None else None  # drawn every step, as diffusers does
        if s[i + 1] == 0:  # exp(-h) = 0: both the ODE and the SDE step land on the denoised estimate
            x, old = after(denoised, i + 1), None
            continue
        h = math.log(s[i] / s[i + 1])
        d1 = None  # first difference of the data predictions, scaled by the step ratio
        if old is not None and not (i == n - 1 and final_first_order):
            d1 = (denoised - old) * (h / h_last)
        if z is None:
            phi = -math.expm1(-h)  # 1 - sigma_next / sigma
            x = x * (s[i + 1] / s[i]) + denoised * phi
            if d1 is not None:
                x = x + d1 * (0.5 * phi if solver_type == "midpoint" else 1.0 - phi / h)
        else:
            phi = -math.expm1(-2.0 * h)
            x = x * (s[i + 1] / s[i] * math.exp(-h)) + denoised * phi + z * (s[i + 1] * math.sqrt(phi))
            if d1 is not None:
                x = x + d1 * (0.5 * phi if solver_type == "midpoint" else 1.0 - phi / (2.0 * h))
        x = after(x, i + 1)
        old, h_last = denoised, h
    return x


def _unipc_update(
    x: np.ndarray, s0: float, s1: float, m0: np.ndarray, history: list, p: int, bh2: bool, m1: np.ndarray | None = None
) -> np.ndarray:
    """One UniP (predictor, m1 None) or UniC (corrector, m1 = data prediction at s1) update of order p.

    history: (lambda, data prediction) of earlier points, newest first; lambda = -log sigma.
    """
    lam0 = -math.log(s0)
    h = math.log(s0 / s1)
    hh = -h  # data-prediction form
    h_phi_1 = math.expm1(hh)
    b_h = math.expm1(hh) if bh2 else hh
    points = list(history[: p - 1])
    rks = [(lam - lam0) / h for lam, _ in points] + [1.0]
    # order conditions R rho = b (Zhao et al. 2023, eq. 8 / algorithm 2)
    R, b, phi_k, fact = [], [], h_phi_1 / hh - 1.0, 1.0
    for k in range(1, p + 1):
        R.append([r ** (k - 1) for r in rks])
        b.append(phi_k * fact / b_h)
        fact *= k + 1
        phi_k = phi_k / hh - 1.0 / fact
    if m1 is None:
        rhos = [] if p == 1 else [0.5] if p == 2 else list(np.linalg.solve(np.array(R)[:-1, :-1], b[:-1]))
    else:
        rhos = [0.5] if p == 1 else list(np.linalg.solve(np.array(R), b))
        points.append((lam0 + h, m1))  # the new prediction sits at r = 1
    # x1 = (s1/s0) x - h_phi_1 m0 - B(h) sum_k rho_k (m_k - m0) / r_k, expanded into one linear combination
    ws = [-b_h * float(rho) / r for rho, r in zip(rhos, rks)]
    out = x * (s1 / s0) + m0 * (-h_phi_1 - sum(ws))
    for w, (_, m) in zip(ws, points):
        out = out + m * w
    return out


def sample_unipc(
    model: Denoiser,
    x: np.ndarray,
    sigmas: Sequence[float],
    order: int = 2,
    variant: str = "bh2",
    lower_order_final: bool = True,
    disable_corrector: Sequence[int] = (),
    after: AfterFn = _same,
) -> np.ndarray:
    """UniPC (Zhao et al. 2023): UniP-p predictor and UniC corrector on data predictions, multistep."""
    s = [float(v) for v in sigmas]
    n = len(s) - 1
    history: list = []  # (lambda, data prediction), newest first
    x_last, p_last = x, 1
    for i in range(n):
        denoised = model(x, s[i])
        if i > 0 and i - 1 not in disable_corrector:  # refine the point just predicted with its own evaluation
            x = _unipc_update(x_last, s[i - 1], s[i], history[0][1], history[1:], p_last, variant == "bh2", denoised)
        history = [(-math.log(s[i]), denoised), *history][:order]
        p = min(order, n - i) if lower_order_final else order
        p = min(p, i + 1)  # warm-up: no more past points than exist
        x_last, p_last = x, p
        if s[i + 1] == 0:  # exp(-h) = 0: the order-1 update lands on the denoised estimate
            x = denoised
        elif s[i + 1] != s[i]:  # a Karras schedule ending at its own sigma_min repeats it: a zero step
            x = _unipc_update(x, s[i], s[i + 1], denoised, history[1:], p, variant == "bh2")
        # the corrector restarts from x_last, not from this: as in diffusers, `after` reaches the model input only
        x = after(x, i + 1)
    return x


def _ddim_jump(x: np.ndarray, eps: np.ndarray, a: float, a_prev: float) -> np.ndarray:
    """Deterministic DDIM move of VP sample x from alpha-bar a to a_prev along eps (PNDM's eq. 9)."""
    return x * math.sqrt(a_prev / a) + eps * (math.sqrt(1.0 - a_prev) - math.sqrt(a_prev * (1.0 - a) / a))


def sample_ddim(
    model: Denoiser,
    x: np.ndarray,
    timesteps: Sequence[float],
    alpha_bar: Callable[[int], float],
    step_ratio: int,
    after: AfterFn = _same,
) -> np.ndarray:
    """DDIM with eta = 0 (Song et al. 2021): each step predicts x0 and eps and jumps step_ratio timesteps down."""
    for i, t in enumerate(int(v) for v in timesteps):
        a, a_prev = alpha_bar(t), alpha_bar(t - step_ratio)
        x0, eps = model.split(model.output(x, t), x, a)
        x = after(x0 * math.sqrt(a_prev) + eps * math.sqrt(1.0 - a_prev), i + 1)  # x0 may be clipped, eps is not
    return x


def sample_pndm(
    model: Denoiser,
    x: np.ndarray,
    timesteps: Sequence[float],
    alpha_bar: Callable[[int], float],
    step_ratio: int,
    prk_calls: int = 0,
    after: AfterFn = _same,
) -> np.ndarray:
    """PNDM (Liu et al. 2022): pseudo Runge-Kutta warm-up (prk_calls > 0), then pseudo linear multistep (PLMS)."""
    ts = [int(v) for v in timesteps]
    half = step_ratio // 2

    def jump(sample, out, t, t_prev):  # diffusers converts a (possibly averaged) raw output to eps here
        a = alpha_bar(t)
        return _ddim_jump(sample, model.split(out, sample, a)[1], a, alpha_bar(t_prev))

    ets: list[np.ndarray] = []  # first output of each step, oldest first
    for g in range(0, prk_calls, 4):  # classic RK4 in four calls: half step, half step, full step, combination
        t, start = ts[g], x
        e1 = model.output(x, t)
        ets.append(e1)
        e2 = model.output(after(jump(start, e1, t, t - half), g + 1), ts[g + 1])
        e3 = model.output(after(jump(start, e2, t, ts[g + 1]), g + 2), ts[g + 2])
        e4 = model.output(after(jump(start, e3, t, ts[g + 2] - half), g + 3), ts[g + 3])
        x = after(jump(start, (e1 + 2.0 * e2 + 2.0 * e3 + e4) * (1.0 / 6.0), t, ts[g + 3]), g + 4)
    start = x
    for c in range(prk_calls, len(ts)):
        t, t_prev = ts[c], ts[c] - step_ratio
        e = model.output(x, t)
        if c == 1:  # the repeated second timestep redoes step 0 from its start, with averaged outputs (Heun-like)
            t, t_prev, x, e = t + step_ratio, t, start, (e + ets[-1]) * 0.5
        else:
            ets = [*ets[-3:], e]
            if c == 0:
                start = x
            elif len(ets) == 2:  # Adams-Bashforth of growing order on the outputs
                e = (3.0 * ets[-1] - ets[-2]) * 0.5
            elif len(ets) == 3:
                e = (23.0 * ets[-1] - 16.0 * ets[-2] + 5.0 * ets[-3]) * (1.0 / 12.0)
            elif len(ets) == 4:
                e = (55.0 * ets[-1] - 59.0 * ets[-2] + 37.0 * ets[-3] - 9.0 * ets[-4]) * (1.0 / 24.0)
        x = after(jump(x, e, t, t_prev), c + 1)
    return x


def lcm_scalings(t: float, timestep_scaling: float = 10.0, sigma_data: float = 0.5) -> tuple[float, float]:
    """Consistency-model boundary condition (c_skip, c_out) at timestep t (Song et al. 2023, LCM's discrete form)."""
    st = t * timestep_scaling
    return sigma_data**2 / (st * st + sigma_data**2), st / math.sqrt(st * st + sigma_data**2)


def sample_lcm(
    model: Denoiser,
    x: np.ndarray,
    timesteps: Sequence[float],
    alpha_bar: Callable[[int], float],
    noise: NoiseFn,
    timestep_scaling: float = 10.0,
    after: AfterFn = _same,
) -> np.ndarray:
    """Latent Consistency Model multistep sampling (Luo et al. 2023): estimate x0, re-noise to the next timestep."""
    ts = [int(v) for v in timesteps]
    for i, t in enumerate(ts):
        x0, _ = model.split(model.output(x, t), x, alpha_bar(t))
        c_skip, c_out = lcm_scalings(t, timestep_scaling)
        denoised = x0 * c_out + x * c_skip
        if i == len(ts) - 1:
            return after(denoised, i + 1)
        a = alpha_bar(ts[i + 1])
        x = after(denoised * math.sqrt(a) + noise(x.shape) * math.sqrt(1.0 - a), i + 1)
    return x


# name -> (model, starting x in the sampler's space, schedule, noise, after) -> x at the schedule's end
_RUN: dict[str, Callable[[Denoiser, np.ndarray, Schedule, NoiseFn, AfterFn], np.ndarray]] = {
    "ddim": lambda m, x, s, n, a: sample_ddim(m, x, s.run_timesteps, s.alpha_bar, s.step_ratio, a),
    "pndm": lambda m, x, s, n, a: sample_pndm(
        m, x, s.run_timesteps, s.alpha_bar, s.step_ratio, s.options["prk_calls"], a
    ),
    "euler": lambda m, x, s, n, a: sample_euler(m, x, s.run_sigmas, a),
    "euler_a": lambda m, x, s, n, a: sample_euler_ancestral(m, x, s.run_sigmas, n, a),
    "heun": lambda m, x, s, n, a: sample_heun(m, x, s.run_sigmas, a),
    "lms": lambda m, x, s, n, a: sample_lms(m, x, s.sigmas, begin=s.begin, after=a),  # its coefficients need all
    "unipc": lambda m, x, s, n, a: sample_unipc(m, x, s.run_sigmas, **s.options, after=a),
    "lcm": lambda m, x, s, n, a: sample_lcm(m, x, s.run_timesteps, s.alpha_bar, n, **s.options, after=a),
}


def _dpmpp(m: Denoiser, x: np.ndarray, s: Schedule, n: NoiseFn, a: AfterFn) -> np.ndarray:
    o = s.options
    return sample_dpmpp_2m(m, x, s.run_sigmas, n if o["sde"] else None, o["solver_type"], o["final_first_order"], a)


_RUN.update(dict.fromkeys(("dpmpp_2m", "dpmpp_2m_karras", "dpmpp_2m_sde_karras"), _dpmpp))
_ALPHA_FORM = {"ddim", "pndm", "lcm"}  # written in diffusers' own VP variables; the rest in VE


def _ve_inside(schedule: Schedule) -> bool:
    """DPM-Solver and UniPC: diffusers keeps VP latents, the samplers here run them in VE."""
    return schedule.vp and schedule.sampler not in _ALPHA_FORM


def steps_in_loop(schedule: Schedule) -> int:
    """How many levels the sampler's loop steps through (the j of `after` runs 1 .. this)."""
    run = schedule.run_timesteps if schedule.sampler in _ALPHA_FORM else schedule.run_sigmas[1:]
    return len(run)


def noised(schedule: Schedule, z: np.ndarray, eps: np.ndarray, j: int) -> np.ndarray:
    """Clean latents z noised with eps to level j of the loop (0: its start), in the sampler's working space, as
    diffusers' `scheduler.add_noise` does: VP sqrt(abar) z + sqrt(1 - abar) eps at the timestep for DDIM, PNDM and
    LCM; z + sigma eps for the others (DPM-Solver and UniPC add in VP, alpha (z + sigma eps): the same in VE)."""
    if schedule.sampler in _ALPHA_FORM:
        a = schedule.alpha_bar(int(schedule.run_timesteps[j]))
        return z * math.sqrt(a) + eps * math.sqrt(1.0 - a)
    return z + eps * float(schedule.run_sigmas[j])


def keep_known(schedule: Schedule, z: np.ndarray, eps: np.ndarray, mask: np.ndarray) -> AfterFn:
    """Inpainting with an ordinary UNet: after every step, outside the mask (0 = keep) the sample is the init
    latents z noised with the initial noise eps to the level reached, clean at the end (diffusers' blend)."""
    end, repaint = steps_in_loop(schedule), np.asarray(mask) >= 0.5  # (1|B, 1, h, w)

    def after(x: np.ndarray, j: int) -> np.ndarray:
        return np.where(repaint, x, z if j >= end else noised(schedule, z, eps, j))

    return after


def initial(schedule: Schedule, eps: np.ndarray, z: np.ndarray | None = None) -> np.ndarray:
    """The loop's starting sample in the sampler's working space: unit noise eps times the initial sigma (text to
    image, as diffusers scales its `latents`), or clean latents z noised to the first level (image to image)."""
    eps = np.asarray(eps, dtype=np.float32)
    if z is not None:
        return noised(schedule, z, eps, 0)
    x = eps * schedule.init_noise_sigma
    if _ve_inside(schedule):
        first = float(schedule.run_sigmas[0])
        x = x * math.sqrt(first * first + 1.0)
    return x


class _Stop(Exception):
    """Raised from `after` to leave a sampler's loop at a level (the SDXL base -> refiner handoff)."""

    def __init__(self, x: np.ndarray):
        self.x = x


def to_vp(schedule: Schedule, x: np.ndarray, j: int) -> np.ndarray:
    """The working-space sample at level j of the loop as VP latents (what diffusers hands between pipelines)."""
    if schedule.sampler in _ALPHA_FORM:
        return x
    sigma = float(schedule.run_sigmas[j])
    return x * (1.0 / math.sqrt(sigma * sigma + 1.0))


def from_vp(schedule: Schedule, x: np.ndarray) -> np.ndarray:
    """VP latents at the loop's first level in its working space (the inverse of to_vp at j = 0)."""
    if schedule.sampler in _ALPHA_FORM:
        return np.asarray(x, dtype=np.float32)
    sigma = float(schedule.run_sigmas[0])
    return np.asarray(x * math.sqrt(sigma * sigma + 1.0), dtype=np.float32)


def denoise(
    schedule: Schedule,
    eps_fn: EpsFn,
    x: np.ndarray,
    noise: NoiseFn | None = None,
    callback: Callable[[int, int], None] | None = None,
    after: AfterFn | None = None,
    end: int | None = None,
) -> np.ndarray:
    """Run a schedule's loop from `initial(...)`; returns VP latents, as diffusers hands them to the VAE.

    `noise` feeds the stochastic samplers; `callback(i, total)` runs after each network call; `after` see the
    module docstring. `end`: stop once the sample reaches level `end` of the loop (diffusers' denoising_end) and
    return its VP latents there, still noisy, for another pipeline to carry on (`from_vp`)."""
    model = Denoiser(eps_fn, schedule, callback)
    step = after or _same
    if end is not None:
        inner = step

        def step(x: np.ndarray, j: int) -> np.ndarray:
            x = inner(x, j)
            if j == end:
                raise _Stop(x)
            return x

    try:
        x = _RUN[schedule.sampler](model, x, schedule, noise or _no_noise(schedule.sampler), step)
    except _Stop as stop:
        return to_vp(schedule, stop.x, end)
    if _ve_inside(schedule):
        last = float(schedule.sigmas[-1])
        x = x * (1.0 / math.sqrt(last * last + 1.0))
    return x


def run_sampler(
    name: str,
    eps_fn: EpsFn,
    noise_latents: np.ndarray,
    scheduler_config: Mapping[str, Any],
    num_inference_steps: int,
    noise: NoiseFn | None = None,
    callback: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Text to image: denoise unit noise (B, C, h, w) with a sampler; returns VP latents.

    The start is `noise_latents * init_noise_sigma`, as diffusers scales its `latents` argument."""
    schedule = make_schedule(resolve_sampler(name), scheduler_config, num_inference_steps)
    return denoise(schedule, eps_fn, initial(schedule, noise_latents), noise, callback)


def _no_noise(name: str) -> NoiseFn:
    def draw(shape: tuple[int, ...]) -> np.ndarray:
        raise BadInput(f"sampler {name} is stochastic: pass noise=, a shape -> standard-normal float32 function")

    return draw
