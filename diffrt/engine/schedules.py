"""Noise schedules for the samplers, built from a checkpoint's diffusers scheduler config.

`make_schedule(sampler, config, steps)` reads the config the way `DiffusersClass.from_config(config)` does for
the diffusers class the sampler stands for: a key the checkpoint sets wins, a key it does not set takes that
class's own default (so, as in diffusers, `euler` on an SD1 config without `timestep_spacing` spaces its
timesteps "linspace" while `ddim` spaces them "leading"). The sampler name only fixes the algorithm (Karras
sigmas for the `_karras` names, the DPM-Solver++ variant and order for `dpmpp_*`).

Host math is float64; values diffusers keeps in float32 (betas, alpha-bar, sigmas, timesteps) are rounded to
float32 so the two schedules agree to float32 rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from diffrt.errors import BadInput

# Short name -> the diffusers scheduler class it reproduces.
DIFFUSERS_CLASS = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "lms": "LMSDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "dpmpp_2m_karras": "DPMSolverMultistepScheduler",
    "dpmpp_2m_sde_karras": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "lcm": "LCMScheduler",
}

# Each class's __init__ defaults for the keys read here (diffusers 0.30 - 0.42 agree on these).
_BASE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "steps_offset": 0,
}
_SIGMAS = {
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "sigma_min": None,
    "sigma_max": None,
}  # sigma_min/max: read whenever the config has them, as diffusers does
_MULTISTEP = {
    **_BASE,
    **_SIGMAS,
    "solver_order": 2,
    "thresholding": False,
    "lower_order_final": True,
    "use_flow_sigmas": False,
    "use_dynamic_shifting": False,
    "final_sigmas_type": "zero",
    "timestep_spacing": "linspace",
    "rescale_betas_zero_snr": False,
}
_DEFAULTS: dict[str, dict[str, Any]] = {
    "DDIMScheduler": {
        **_BASE,
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,
        "thresholding": False,
        "timestep_spacing": "leading",
        "rescale_betas_zero_snr": False,
    },
    "PNDMScheduler": {**_BASE, "skip_prk_steps": False, "set_alpha_to_one": False, "timestep_spacing": "leading"},
    "EulerDiscreteScheduler": {
        **_BASE,
        **_SIGMAS,
        "interpolation_type": "linear",
        "timestep_spacing": "linspace",
        "timestep_type": "discrete",
        "rescale_betas_zero_snr": False,
        "final_sigmas_type": "zero",
    },
    "EulerAncestralDiscreteScheduler": {**_BASE, "timestep_spacing": "linspace", "rescale_betas_zero_snr": False},
    "HeunDiscreteScheduler": {
        **_BASE,
        **_SIGMAS,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "clip_sample": False,
        "clip_sample_range": 1.0,
        "timestep_spacing": "linspace",
    },
    "LMSDiscreteScheduler": {**_BASE, **_SIGMAS, "timestep_spacing": "linspace"},
    "DPMSolverMultistepScheduler": {
        **_MULTISTEP,
        "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint",
        "euler_at_final": False,
        "use_lu_lambdas": False,
        "lambda_min_clipped": -math.inf,
        "variance_type": None,
    },
    "UniPCMultistepScheduler": {**_MULTISTEP, "predict_x0": True, "solver_type": "bh2", "disable_corrector": []},
    "LCMScheduler": {
        **_BASE,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "original_inference_steps": 50,
        "clip_sample": False,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,
        "thresholding": False,
        "timestep_scaling": 10.0,
        "rescale_betas_zero_snr": False,
    },
}
# What the sampler name itself decides (from_config overrides).
_OVERRIDES: dict[str, dict[str, Any]] = {
    "dpmpp_2m": {"algorithm_type": "dpmsolver++", "solver_order": 2},
    "dpmpp_2m_karras": {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    "dpmpp_2m_sde_karras": {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
}
# Allowed values of the options read here; anything else diffusers supports (dynamic thresholding, flow or
# exponential sigmas, ...) these samplers do not implement.
_OFF = ("thresholding", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas")
_ALLOWED: dict[str, tuple] = {k: (False,) for k in (*_OFF, "use_dynamic_shifting")}
_ALLOWED.update(timestep_type=("discrete",), interpolation_type=("linear",), variance_type=(None,), predict_x0=(True,))
_ALLOWED.update(final_sigmas_type=("zero", "sigma_min"), prediction_type=("epsilon", "v_prediction", "sample"))
_ALLOWED.update(timestep_spacing=("linspace", "leading", "trailing"))


@dataclass(frozen=True, eq=False)  # arrays inside: identity equality
class Schedule:
    """Everything a sampler needs for one generation. sigmas[i] pairs with timesteps[i]; sigmas[-1] is the end."""

    sampler: str
    sigmas: np.ndarray  # (steps + 1,) VE noise levels sqrt((1 - abar) / abar), descending, float32 values
    timesteps: np.ndarray  # (steps,) the model timestep diffusers uses at each sigma
    init_noise_sigma: float  # diffusers' `scheduler.init_noise_sigma`: its starting latents are noise * this
    vp: bool  # diffusers' latents live in VP space (x0 + sigma eps) / sqrt(1 + sigma^2), not VE
    model_calls: int  # network evaluations in the whole loop (Heun and PNDM make more than one per sigma)
    prediction_type: str  # "epsilon", "v_prediction" or "sample"
    clip_sample_range: float | None  # clip the x0 estimate to +-this (DDIM, Heun, LCM with clip_sample)
    alphas_cumprod: np.ndarray  # (num_train_timesteps,) training alpha-bar, for samplers written in alpha space
    final_alpha_cumprod: float  # alpha-bar "before" t = 0 (set_alpha_to_one)
    step_ratio: int  # num_train_timesteps // steps: DDIM's and PNDM's jump to the previous timestep
    options: Mapping[str, Any] = field(default_factory=dict)  # sampler-specific settings from the config
    begin: int = 0  # image to image: the first step run (diffusers' t_start); sigmas/timesteps keep the whole chain

    @property
    def run_sigmas(self) -> np.ndarray:
        """(steps - begin + 1,) the noise levels the loop visits, the end included."""
        return self.sigmas[self.begin :]

    @property
    def run_timesteps(self) -> np.ndarray:
        return self.timesteps[self.begin :]

    def alpha_bar(self, t: int) -> float:
        """Training alpha-bar at integer timestep t; negative t means the end of the chain, as in diffusers."""
        return float(self.alphas_cumprod[t]) if t >= 0 else self.final_alpha_cumprod


def scheduler_settings(sampler: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """The config `DiffusersClass.from_config(config, **name_overrides)` ends up with, for the keys used here."""
    defaults = _DEFAULTS[DIFFUSERS_CLASS[sampler]]
    # diffusers records the keys a loaded config did not set; from_config treats them as unset
    unset = set(config.get("_use_default_values") or ())
    cfg = {k: (config[k] if k in config and k not in unset else v) for k, v in defaults.items()}
    cfg.update(_OVERRIDES.get(sampler, {}))
    for key, allowed in _ALLOWED.items():
        if key in cfg and cfg[key] not in allowed:
            raise BadInput(
                f"scheduler config {key}={cfg[key]!r} is not supported by the {sampler} sampler; "
                f"supported: {', '.join(map(repr, allowed))}"
            )
    return cfg


HANDOFF_SAMPLERS = ("ddim", "euler", "euler_a", "lms", "dpmpp_2m", "dpmpp_2m_karras", "dpmpp_2m_sde_karras", "unipc")


def handoff_step(sampler: str, timesteps: np.ndarray, fraction: float, num_train_timesteps: int) -> int:
    """How many steps of a schedule lie before the point `fraction` of the way through it, by diffusers'
    rule for denoising_end / denoising_start: the timesteps >= round(T - fraction * T). The base runs these
    steps, the refiner the rest. One model call per step only (no Heun, PNDM's warm-up or LCM)."""
    if sampler not in HANDOFF_SAMPLERS:
        raise BadInput(
            f"sampler {sampler} cannot hand over between two models mid-schedule; use one of "
            f"{', '.join(HANDOFF_SAMPLERS)}"
        )
    cutoff = int(round(num_train_timesteps - fraction * num_train_timesteps))
    k = int((np.asarray(timesteps) >= cutoff).sum())
    if not 0 < k < len(timesteps):
        raise BadInput(
            f"switching models at {fraction:g} of {len(timesteps)} steps leaves one of them no step; "
            "change refiner_at or num_inference_steps"
        )
    return k


def first_step(
    sampler: str, config: Mapping[str, Any], steps: int, strength: float | None, in_schedule: bool = False
) -> int:
    """The step image to image starts at (diffusers' `t_start`): the last int(steps * strength) steps run.

    `in_schedule` (LCM-distilled models, as LatentConsistencyModelImg2ImgPipeline): strength narrows the LCM
    grid instead and all steps run. BadInput when the strength leaves no step."""
    if strength is None:
        return 0
    if in_schedule and sampler == "lcm":
        orig = int(scheduler_settings(sampler, config)["original_inference_steps"])
        if int(orig * strength) // steps < 1:
            raise BadInput(
                f"strength {strength:g} leaves {int(orig * strength)} of the LCM schedule's {orig} timesteps, fewer "
                f"than num_inference_steps={steps}; raise strength to >= {steps / orig:g} or lower the steps"
            )
        return 0
    kept = min(int(steps * strength), steps)
    if kept < 1:
        raise BadInput(
            f"strength {strength:g} with {steps} steps runs no step (int({steps} x {strength:g}) = 0); "
            f"raise strength to >= {1 / steps:.3g} or num_inference_steps"
        )
    begin = steps - kept
    if begin and sampler == "pndm" and not scheduler_settings(sampler, config)["skip_prk_steps"]:
        raise BadInput(
            "pndm with pseudo Runge-Kutta warm-up (skip_prk_steps=false) cannot start mid-schedule; "
            "use strength 1.0 or another sampler for image to image"
        )
    return begin


def make_schedule(
    sampler: str,
    config: Mapping[str, Any],
    num_inference_steps: int,
    strength: float | None = None,
    strength_in_schedule: bool = False,
    start: float | None = None,
) -> Schedule:
    """The schedule diffusers' `set_timesteps(num_inference_steps)` builds for this sampler and config; with
    `strength` (image to image), starting where diffusers' img2img pipelines start (`first_step`); with `start`
    (diffusers' denoising_start, the SDXL refiner's share), at the first step below that point."""
    cfg = scheduler_settings(sampler, config)
    n, T = int(num_inference_steps), int(cfg["num_train_timesteps"])
    if not 1 <= n <= T:
        raise BadInput(f"num_inference_steps must be between 1 and {T} for this checkpoint, got {n}")
    begin = first_step(sampler, config, n, strength, strength_in_schedule)
    ac = alphas_cumprod(cfg)
    cls = DIFFUSERS_CLASS[sampler]
    if cfg.get("rescale_betas_zero_snr") and cls not in ("DDIMScheduler", "LCMScheduler"):
        ac[-1] = 2.0**-24  # diffusers' guard so that sigma_max stays finite in sigma-space schedulers
    with np.errstate(divide="ignore"):  # a zero-SNR end has sigma = inf; only DDIM and LCM keep it
        train_sigmas = _f32(np.sqrt((1.0 - ac) / ac))
    ratio = T // n
    final_alpha = 1.0 if cfg.get("set_alpha_to_one") else float(ac[0])
    clip = float(cfg["clip_sample_range"]) if cfg.get("clip_sample") else None
    extra = {"strength": strength} if strength is not None and strength_in_schedule and sampler == "lcm" else {}
    sigmas, timesteps, init, vp, calls, options = _BUILDERS[cls](cfg, n, train_sigmas, ac, final_alpha, **extra)
    if start is not None:
        begin = handoff_step(sampler, timesteps, start, T)
    for a in (sigmas, timesteps, ac):
        a.flags.writeable = False
    if begin:
        calls -= 2 * begin if sampler == "heun" else begin  # Heun: two calls per step but the last
        if sampler == "unipc":  # diffusers counts disable_corrector in steps of the whole chain
            options = {**options, "disable_corrector": tuple(d - begin for d in options["disable_corrector"])}
    options = MappingProxyType(options)
    return Schedule(
        sampler, sigmas, timesteps, init, vp, calls, cfg["prediction_type"], clip, ac, final_alpha, ratio, options,
        begin,
    )  # fmt: skip


def alphas_cumprod(cfg: Mapping[str, Any]) -> np.ndarray:
    """Training alpha-bar (DDPM, Ho et al. 2020) from the beta schedule, as diffusers computes it in float32."""
    T = int(cfg["num_train_timesteps"])
    if cfg.get("trained_betas") is not None:
        betas = np.asarray(cfg["trained_betas"], dtype=np.float32)
    elif cfg["beta_schedule"] == "linear":
        betas = np.linspace(cfg["beta_start"], cfg["beta_end"], T).astype(np.float32)
    elif cfg["beta_schedule"] == "scaled_linear":  # linear in sqrt(beta): Stable Diffusion's schedule
        betas = np.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, T).astype(np.float32) ** 2
    elif cfg["beta_schedule"] == "squaredcos_cap_v2":
        betas = _cosine_betas(T)
    else:
        raise BadInput(
            f"scheduler beta_schedule {cfg['beta_schedule']!r} is not supported; "
            "expected linear, scaled_linear or squaredcos_cap_v2"
        )
    if cfg.get("rescale_betas_zero_snr"):
        betas = _zero_terminal_snr(betas)
    # torch accumulates a float32 cumprod in float64 on the CPU: do the same, then store float32
    return _f32(np.cumprod(1.0 - betas.astype(np.float64)))


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022), eq. 5: n levels evenly spaced in sigma^(1/rho), sigma_max first."""
    ramp = np.linspace(0.0, 1.0, n)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigma: np.ndarray, log_train_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma, interpolating linearly in log sigma between neighbours."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    low = np.clip(np.searchsorted(log_train_sigmas, log_sigma, side="right") - 1, 0, len(log_train_sigmas) - 2)
    lo, hi = log_train_sigmas[low], log_train_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0.0, 1.0)
    return (1.0 - w) * low + w * (low + 1)


def spaced_timesteps(
    spacing: str, n: int, T: int, offset: int, *, rounded: bool = True, skip_zero: bool = False, last: int | None = None
) -> np.ndarray:
    """Descending model timesteps for n steps: "linspace", "leading" or "trailing" (Lin et al. 2023, table 2).

    rounded=False keeps linspace's fractions (the sigma-space schedulers do). skip_zero places n + 1 points
    and drops the one at t = 0, as DPM-Solver and UniPC do; `last` is DPM-Solver's lambda-clipped end.
    """
    last = T if last is None else last
    m = n + 1 if skip_zero else n
    if spacing == "linspace":
        t = np.linspace(0, last - 1, m)
        t = (np.round(t) if rounded else t.astype(np.float32))[::-1]
    elif spacing == "leading":
        t = np.round(np.arange(m) * (last // m))[::-1] + offset
    else:  # trailing: np.arange with a fractional step, as diffusers does (its length follows numpy's rounding)
        return np.round(np.arange(last, 0, -T / n)) - 1.0
    return t[:-1] if skip_zero else t


def _f32(a: np.ndarray) -> np.ndarray:
    """Round to float32 precision, keep float64 storage."""
    return np.asarray(a, dtype=np.float32).astype(np.float64)


def _cosine_betas(T: int, max_beta: float = 0.999) -> np.ndarray:
    """Improved-DDPM cosine schedule (Nichol & Dhariwal 2021), betas capped at max_beta."""
    f = [math.cos((i / T + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(T + 1)]
    return np.array([min(1 - f[i + 1] / f[i], max_beta) for i in range(T)], dtype=np.float32)


def _zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale betas so the last timestep has zero SNR (Lin et al. 2023, algorithm 1)."""
    sqrt_ab = np.sqrt(np.cumprod(1.0 - betas.astype(np.float64)))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    ab = ((sqrt_ab - last) * (first / (first - last))) ** 2
    return (1.0 - np.concatenate([ab[:1], ab[1:] / ab[:-1]])).astype(np.float32)


def _karras_range(cfg: Mapping[str, Any], lo: float, hi: float) -> tuple[float, float]:
    """The config's sigma_min / sigma_max when it sets them, else the schedule's ends."""
    smin, smax = cfg.get("sigma_min"), cfg.get("sigma_max")
    return (lo if smin is None else float(smin)), (hi if smax is None else float(smax))


_Built = tuple[np.ndarray, np.ndarray, float, bool, int, dict]


def _sigma_space(cfg, n, train_sigmas, ac, final_alpha, *, heun=False, lms=False, ancestral=False) -> _Built:
    """Euler, Euler ancestral, Heun and LMS: sigmas interpolated at the spaced timesteps, latents kept in VE."""
    T, spacing = int(cfg["num_train_timesteps"]), cfg["timestep_spacing"]
    t = spaced_timesteps(spacing, n, T, int(cfg["steps_offset"]), rounded=False)
    s = np.interp(t, np.arange(T), train_sigmas)
    if not ancestral and cfg["use_karras_sigmas"]:
        # Karras between this spacing's own ends; LMS ignores a configured sigma_min / sigma_max
        lo, hi = (float(s[-1]), float(s[0])) if lms else _karras_range(cfg, float(s[-1]), float(s[0]))
        s = karras_sigmas(lo, hi, len(t))
        t = sigma_to_t(s, np.log(train_sigmas))
    end = float(train_sigmas[0]) if cfg.get("final_sigmas_type") == "sigma_min" else 0.0
    sigmas = _f32(np.append(s, end))
    smax = float(np.float32(sigmas.max()))
    # diffusers' convention: linspace / trailing start at sigma_max, leading at sqrt(sigma_max^2 + 1)
    init = smax if spacing in ("linspace", "trailing") else math.sqrt(smax * smax + 1.0)
    calls = 2 * len(t) - 1 if heun else len(t)
    return sigmas, _f32(t), init, False, calls, {}


def _multistep(cfg, n, train_sigmas, ac, final_alpha, *, unipc=False) -> _Built:
    """DPM-Solver++ and UniPC: integer timesteps over the whole range, latents in VP space."""
    T = int(cfg["num_train_timesteps"])
    log_sigmas = np.log(train_sigmas.astype(np.float32)).astype(np.float64)
    if cfg["use_karras_sigmas"]:
        lo, hi = _karras_range(cfg, float(train_sigmas[0]), float(train_sigmas[-1]))
        s = karras_sigmas(lo, hi, n)
        t = sigma_to_t(s, log_sigmas)
        if unipc or cfg["beta_schedule"] != "squaredcos_cap_v2":
            t = np.round(t)
        t = np.trunc(t)  # diffusers casts to int64
        end = float(s[-1]) if unipc else float(train_sigmas[0])
    else:
        last = T
        if not unipc and cfg["lambda_min_clipped"] > -math.inf:  # stop before log-SNR falls below the clip
            lam = 0.5 * np.log(ac) - 0.5 * np.log(1.0 - ac)
            last = T - int(np.searchsorted(lam[::-1], cfg["lambda_min_clipped"]))
        t = spaced_timesteps(cfg["timestep_spacing"], n, T, int(cfg["steps_offset"]), skip_zero=True, last=last)
        s = train_sigmas[t.astype(np.int64)]
        end = float(train_sigmas[0])
    sigmas = _f32(np.append(s, 0.0 if cfg["final_sigmas_type"] == "zero" else end))
    k = len(t)
    if unipc:
        solver = "bh1" if cfg["solver_type"] == "bh1" else "bh2"  # diffusers maps DPM-Solver names to bh2
        options = {
            "order": int(cfg["solver_order"]),
            "variant": solver,
            "lower_order_final": cfg["lower_order_final"],
            "disable_corrector": tuple(cfg["disable_corrector"] or ()),
        }
    else:
        # diffusers takes a first-order last step when it ends at zero or on few steps
        final_first = bool(cfg["euler_at_final"] or (cfg["lower_order_final"] and k < 15) or sigmas[-1] == 0)
        options = {
            "sde": cfg["algorithm_type"] == "sde-dpmsolver++",
            "final_first_order": final_first,
            "solver_type": "heun" if cfg["solver_type"] == "heun" else "midpoint",
        }
    return sigmas, t, 1.0, True, k, options


def _sigma_of(ac_value: float) -> float:
    return math.sqrt((1.0 - ac_value) / ac_value) if ac_value > 0 else math.inf


def _ddim(cfg, n, train_sigmas, ac, final_alpha) -> _Built:
    """DDIM: integer timesteps; each step lands step_ratio below, which need not be the next timestep."""
    T = int(cfg["num_train_timesteps"])
    t = spaced_timesteps(cfg["timestep_spacing"], n, T, int(cfg["steps_offset"]))
    end = _sigma_of(float(ac[int(t[-1]) - T // n]) if t[-1] - T // n >= 0 else final_alpha)
    return np.append(train_sigmas[t.astype(np.int64)], end), t, 1.0, True, len(t), {}


def _pndm(cfg, n, train_sigmas, ac, final_alpha) -> _Built:
    """PNDM: PLMS repeats the second timestep; without skip_prk_steps, 12 pseudo Runge-Kutta calls come first."""
    T = int(cfg["num_train_timesteps"])
    up = spaced_timesteps(cfg["timestep_spacing"], n, T, int(cfg["steps_offset"]))[::-1].astype(np.int64)
    if cfg["skip_prk_steps"]:
        prk = np.zeros(0, np.int64)
        plms = np.concatenate([up[:-1], up[-2:-1], up[-1:]])[::-1]
    else:
        if len(up) < 4:
            raise BadInput(f"pndm with pseudo Runge-Kutta warm-up (skip_prk_steps=false) needs >= 4 steps, got {n}")
        half = T // n // 2
        prk = (up[-4:].repeat(2) + np.tile([0, half], 4))[:-1].repeat(2)[1:-1][::-1]
        plms = up[:-3][::-1]
    t = np.concatenate([prk, plms]).astype(np.float64)
    end = _sigma_of(float(ac[int(t[-1]) - T // n]) if t[-1] - T // n >= 0 else final_alpha)
    sigmas = np.append(train_sigmas[t.astype(np.int64)], end)
    return sigmas, t, 1.0, True, len(t), {"prk_calls": len(prk)}


def _lcm(cfg, n, train_sigmas, ac, final_alpha, strength: float = 1.0) -> _Built:
    """LCM: n timesteps picked evenly from the original_inference_steps grid the model was distilled on (its
    lowest int(orig * strength) points, for LCM's own image to image)."""
    T, orig = int(cfg["num_train_timesteps"]), int(cfg["original_inference_steps"])
    if n > orig:
        raise BadInput(f"lcm runs at most original_inference_steps={orig} steps, got {n}")
    grid = (np.arange(1, int(orig * strength) + 1) * (T // orig) - 1)[::-1]
    t = grid[np.floor(np.linspace(0, len(grid), num=n, endpoint=False)).astype(np.int64)].astype(np.float64)
    sigmas = np.append(train_sigmas[t.astype(np.int64)], 0.0)
    return sigmas, t, 1.0, True, len(t), {"timestep_scaling": float(cfg["timestep_scaling"])}


_BUILDERS: dict[str, Callable[..., _Built]] = {
    "DDIMScheduler": _ddim,
    "PNDMScheduler": _pndm,
    "EulerDiscreteScheduler": _sigma_space,
    "EulerAncestralDiscreteScheduler": lambda *a: _sigma_space(*a, ancestral=True),
    "HeunDiscreteScheduler": lambda *a: _sigma_space(*a, heun=True),
    "LMSDiscreteScheduler": lambda *a: _sigma_space(*a, lms=True),
    "DPMSolverMultistepScheduler": _multistep,
    "UniPCMultistepScheduler": lambda *a: _multistep(*a, unipc=True),
    "LCMScheduler": _lcm,
}
